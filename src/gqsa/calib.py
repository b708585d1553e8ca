"""Calibration and evaluation text, tokenization, and capture of decoder-block inputs."""
from __future__ import annotations

import math
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


def held_out_count(nsamples: int, val_fraction: float) -> int:
    """How many of ``nsamples`` calibration windows are held out for early stopping: ``ceil(n · val_fraction)``,
    at least one when ``val_fraction > 0``, none when it is 0 (the last windows, :func:`gqsa.pipeline.split_calibration`)."""
    return 0 if val_fraction <= 0 else max(1, math.ceil(nsamples * val_fraction))


def sample_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int = 0,
                   val_fraction: float = 0.0) -> torch.Tensor:
    """``nsamples`` random windows of ``seqlen`` tokens (GPTQ's calibration sampling), ``[n, seqlen]``; they may
    overlap, and a warning says so when they need more tokens than the text has.

    ``val_fraction`` > 0: the last :func:`held_out_count` windows (those the trained stages hold out) are drawn
    from the tail of the text — its last ``ceil(T · val_fraction)`` tokens, at least ``seqlen + 1`` — and the
    training windows from the rest, so that no held-out window shares a token position with a training window
    (windows drawn from the whole text overlap each other, and a held-out split of them measures text the
    training saw). Seeded: the same call gives the same windows; ``val_fraction=0`` gives those of before."""
    if nsamples <= 0 or seqlen <= 0:
        raise ValueError(f"nsamples and seqlen must be positive, got {nsamples} and {seqlen}")
    if ids.numel() <= seqlen:
        raise ValueError(f"the calibration text has {ids.numel()} tokens, fewer than seqlen={seqlen}; "
                         f"use a longer text or a smaller --seqlen")
    g = torch.Generator().manual_seed(seed)
    total = ids.numel()
    n_val = held_out_count(nsamples, val_fraction)
    if n_val == 0:
        if nsamples * seqlen > total:
            warnings.warn(f"calibration: {nsamples} windows of {seqlen} tokens need {nsamples * seqlen:,} tokens "
                          f"and the text has {total:,}: the windows overlap (each token used "
                          f"{nsamples * seqlen / total:.1f}× on average); a longer text adds more than more windows",
                          stacklevel=2)
        starts = torch.randint(0, total - seqlen, (nsamples,), generator=g)
        return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])
    n_train = nsamples - n_val
    if n_train < 1:
        raise ValueError(f"{nsamples} calibration window(s) cannot be split into training and held-out windows "
                         f"(val_fraction={val_fraction}): use more --nsamples or val_fraction=0")
    tail = max(math.ceil(total * val_fraction), seqlen + 1)
    head = total - tail
    if head <= seqlen:
        raise ValueError(f"the calibration text has {total:,} tokens, too few to hold out its last "
                         f"{val_fraction:g} for the held-out windows and train on the rest (each part needs more "
                         f"than seqlen={seqlen} tokens, {2 * (seqlen + 1):,} in all): use a longer text, a smaller "
                         f"--seqlen, or --val-fraction 0")
    over = []
    if n_train * seqlen > head:
        over.append(f"{n_train} training windows of {seqlen} tokens need {n_train * seqlen:,} tokens and the first "
                    f"{head:,} tokens of the text, which they are drawn from, hold fewer: the training windows "
                    f"overlap (each token used {n_train * seqlen / head:.1f}× on average)")
    if n_val * seqlen > tail:
        over.append(f"the {n_val} held-out windows need {n_val * seqlen:,} tokens and are drawn from the last "
                    f"{tail:,}: they overlap one another ({n_val * seqlen / tail:.1f}×)")
    if over:
        warnings.warn(f"calibration: {'; '.join(over)}; no held-out window overlaps a training window; a longer "
                      f"text adds more than more windows", stacklevel=2)
    train = torch.randint(0, head - seqlen, (n_train,), generator=g)
    val = head + torch.randint(0, tail - seqlen, (n_val,), generator=g)
    return torch.stack([ids[s:s + seqlen] for s in torch.cat([train, val]).tolist()])


def calibration_tokens(source: str, tokenizer, nsamples: int = 128, seqlen: int = 2048, seed: int = 0,
                       model=None, progress: bool = True, val_fraction: float = 0.0):
    """``[nsamples, seqlen]`` calibration windows of a text file or dataset name, or, for ``source ==
    "self"``, sampled from ``model`` itself (:func:`self_tokens`: for a model without data of its domain;
    ``progress``: its bar).

    ``val_fraction``: pass the trained stages' ``config.val_fraction`` so that the windows they hold out (the
    last :func:`held_out_count`) come from text no training window covers (:func:`sample_windows`). Windows
    sampled from the model are independent samples, each from its own BOS, and need no such split."""
    if source == SELF:
        if model is None:
            raise ValueError("--calib self samples the calibration text from the model: pass model=")
        return self_tokens(model, tokenizer, nsamples, seqlen, seed, progress=progress)
    return sample_windows(tokenize(read_text(source, "calibration"), tokenizer, source), nsamples, seqlen, seed,
                          val_fraction)


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
