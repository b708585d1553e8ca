"""Calibration and evaluation text, tokenization, and capture of decoder-block inputs."""
from __future__ import annotations

from pathlib import Path

import torch

# Hub datasets by short name: (dataset, config, split for calibration, split for evaluation, field, joiner)
HF_DATASETS = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "train", "test", "text", "\n\n"),
    "ptb": ("ptb_text_only", "penn_treebank", "train", "test", "sentence", " "),
    "c4": ("allenai/c4", "en", "train", "validation", "text", " "),
}


def read_text(source: str, purpose: str = "calibration") -> str:
    """Text of a local file, or of a Hugging Face dataset named by a short name in
    :data:`HF_DATASETS` (train split for calibration, test split for evaluation)."""
    path = Path(source).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8", errors="replace")
    if path.exists():
        raise ValueError(f"{source} is a folder; pass a text file or a dataset name ({', '.join(HF_DATASETS)})")
    if source not in HF_DATASETS:
        raise FileNotFoundError(
            f"{source}: no such file, and not a known dataset name ({', '.join(HF_DATASETS)})")
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


def tokenize(text: str, tokenizer) -> torch.Tensor:
    """Tokenize a whole text once (one BOS at the start if the tokenizer adds one): ``[T]`` int64."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=True).input_ids[0]
    if ids.numel() < 2:
        raise ValueError("the text is empty after tokenization")
    return ids


def sample_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``nsamples`` random windows of ``seqlen`` tokens (GPTQ's calibration sampling), ``[n, seqlen]``."""
    if nsamples <= 0 or seqlen <= 0:
        raise ValueError(f"nsamples and seqlen must be positive, got {nsamples} and {seqlen}")
    if ids.numel() <= seqlen:
        raise ValueError(f"the calibration text has {ids.numel()} tokens, fewer than seqlen={seqlen}; "
                         f"use a longer text or a smaller --seqlen")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (nsamples,), generator=g)
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])


def calibration_tokens(source: str, tokenizer, nsamples: int = 128, seqlen: int = 2048, seed: int = 0):
    return sample_windows(tokenize(read_text(source, "calibration"), tokenizer), nsamples, seqlen, seed)


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
