"""Calibration and evaluation text, tokenization, and capture of decoder-block inputs."""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

from .sources import HF_DATASETS, SELF, check_text_source  # noqa: F401  (HF_DATASETS, SELF: this module's interface)


def read_text(source: str, purpose: str = "calibration") -> str:
    """Text of a local file, or of a Hugging Face dataset named by a short name in
    :data:`HF_DATASETS` (train split for calibration, test split for evaluation)."""
    path = Path(source).expanduser()
    if path.is_file():
        data = path.read_bytes()
        if b"\x00" in data[:1 << 16]:  # text never holds NUL bytes; a model or archive file does
            raise ValueError(f"{source} is not a text file (it holds binary data); pass a text file or a dataset "
                             f"name ({', '.join(HF_DATASETS)})")
        return data.decode("utf-8", errors="replace")
    check_text_source(source)  # a folder, or neither a file nor a dataset name: one line
    try:
        import datasets
    except ImportError as e:
        raise ValueError(f"reading the dataset '{source}' needs the `datasets` package "
                         f"(pip install datasets), or pass a local text file") from e
    name, config, train, test, field, joiner = HF_DATASETS[source]
    split = train if purpose == "calibration" else test
    kw = {"data_files": {"validation": "en/c4-validation.00000-of-00008.json.gz"}} if source == "c4" else {}
    rows = datasets.load_dataset(name, config if source != "c4" else None, split=split, **kw)[field]
    if source == "c4":
        rows = rows[:20000]
    return joiner.join(rows)


def tokenize(text: str, tokenizer, source: str | None = None) -> torch.Tensor:
    """Tokenize a whole text once (one BOS at the start if the tokenizer adds one): ``[T]`` int64. ``source``
    (the file or dataset name) is named in the error for a text without tokens."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=True).input_ids[0]
    if ids.numel() < 2:
        raise ValueError(f"{source + ': ' if source else ''}the text is empty after tokenization: pass a file with "
                         "some text in it")
    return ids


def sample_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``nsamples`` random windows of ``seqlen`` tokens (GPTQ's calibration sampling), ``[n, seqlen]``; they may
    overlap, and a warning says so when they need more tokens than the text has."""
    if nsamples <= 0 or seqlen <= 0:
        raise ValueError(f"nsamples and seqlen must be positive, got {nsamples} and {seqlen}")
    if ids.numel() <= seqlen:
        raise ValueError(f"the calibration text has {ids.numel()} tokens, fewer than seqlen={seqlen}; "
                         f"use a longer text or a smaller --seqlen")
    if nsamples * seqlen > ids.numel():
        warnings.warn(f"calibration: {nsamples} windows of {seqlen} tokens need {nsamples * seqlen:,} tokens and "
                      f"the text has {ids.numel():,}: the windows overlap (each token used "
                      f"{nsamples * seqlen / ids.numel():.1f}× on average); a longer text adds more than more windows",
                      stacklevel=2)
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (nsamples,), generator=g)
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])


def calibration_tokens(source: str, tokenizer, nsamples: int = 128, seqlen: int = 2048, seed: int = 0,
                       model=None, progress: bool = True):
    """``[nsamples, seqlen]`` calibration windows of a text file or dataset name, or, for ``source ==
    "self"``, sampled from ``model`` itself (:func:`self_tokens`: for a model without data of its domain;
    ``progress``: its bar)."""
    if source == SELF:
        if model is None:
            raise ValueError("--calib self samples the calibration text from the model: pass model=")
        return self_tokens(model, tokenizer, nsamples, seqlen, seed, progress=progress)
    return sample_windows(tokenize(read_text(source, "calibration"), tokenizer, source), nsamples, seqlen, seed)


@torch.no_grad()
def self_tokens(model, tokenizer, nsamples: int, seqlen: int, seed: int = 0, batch_size: int = 32,
                progress: bool = True) -> torch.Tensor:
    """``[nsamples, seqlen]`` windows sampled from ``model`` (temperature 1, the full distribution), each
    starting at the tokenizer's BOS; seeded, so the same call gives the same windows. Sampling goes on
    through end-of-sequence tokens (the model starts a new text), so every window is full length. ``progress``:
    a bar of the decoding steps, with its estimate of the time left (minutes for a large model at long windows)."""
    if nsamples <= 0 or seqlen <= 1:
        raise ValueError(f"nsamples must be positive and seqlen > 1, got {nsamples} and {seqlen}")
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        bos = getattr(tokenizer, "eos_token_id", None)
    if bos is None:
        raise ValueError("--calib self needs a tokenizer with a BOS (or EOS) token to start the samples from")
    import inspect

    device = next(model.parameters()).device
    # transformers >= 5.2x names the KV cache argument and output `cache` (`past_key_values` before)
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    from tqdm.auto import tqdm

    g = torch.Generator().manual_seed(seed)
    out = []
    bar = tqdm(total=-(-nsamples // batch_size) * (seqlen - 1), desc="sampling calibration text", unit="step",
               disable=not progress)
    for start in range(0, nsamples, batch_size):
        b = min(batch_size, nsamples - start)
        ids = torch.full((b, 1), int(bos), dtype=torch.long)
        seq, past = [ids], None
        for _ in range(seqlen - 1):
            o = model(ids.to(device), use_cache=True, **{key: past})
            past = o.get("cache", None) if o.get("cache", None) is not None else o.get("past_key_values")
            probs = torch.softmax(o.logits[:, -1].float().cpu(), -1)
            ids = torch.multinomial(probs, 1, generator=g)
            seq.append(ids)
            bar.update()
        out.append(torch.cat(seq, 1))
    bar.close()
    return torch.cat(out)


class _Captured(Exception):
    pass


@torch.no_grad()
def capture_block_inputs(model, blocks, tokens: torch.Tensor, batch_size: int, device) -> list:
    """Run the model up to its first decoder block on ``tokens`` ``[n, T]`` in batches and return
    ``[(hidden_states, kwargs), …]`` per batch: exactly what the block receives (attention mask,
    position embeddings, …), so any block can be replayed on any inputs.

    Only the layers before the first block need to be on ``device``.
    """
    captured = []

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden, {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise _Captured

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in tokens.split(batch_size):
            try:
                model(batch.to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    return captured


def block_output(block, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out
