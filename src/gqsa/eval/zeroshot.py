"""Zero-shot log-likelihood evaluation over local task files (``data/zeroshot/*.jsonl`` of the
shared assets, in llm-foundry's field layout; see ``../shared/assets/README.md``).

* multiple choice (PIQA, ARC-easy, ARC-challenge, BoolQ): context ``query + "\\nAnswer:"``, each
  choice ``" " + choice`` as the continuation; ``acc`` picks the choice of highest summed
  log-likelihood, ``acc_norm`` the highest log-likelihood per character of the choice (the
  lm-eval harness's length normalization);
* WinoGrande (partial scoring): each option fills the blank in the context, the shared rest of the
  sentence is the continuation; the option under which it is likelier wins;
* LAMBADA: the last word is the continuation; ``acc`` = greedy decoding reproduces it exactly
  (every token the argmax), ``ppl`` = ``exp(−mean log-likelihood)`` of the last word.

Tokenization follows the lm-eval harness: ``whole = tok(context + continuation)``, ``ctx =
tok(context)``, the continuation tokens are ``whole[len(ctx):]`` (a space at the end of the context
moves to the continuation); inputs longer than the model's context are cut from the left.
Requests are sorted by length and run in padded batches. Prompts follow llm-foundry's local task
definitions, so scores are close to, not identical with, the harness's.
"""
from __future__ import annotations

import inspect
import json
import math
import os
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .ppl import model_context

TASKS = {  # name: (file, kind)
    "piqa": ("piqa.jsonl", "mc"),
    "arc_easy": ("arc_easy.jsonl", "mc"),
    "arc_challenge": ("arc_challenge.jsonl", "mc"),
    "boolq": ("boolq.jsonl", "mc"),
    "winogrande": ("winogrande.jsonl", "schema"),
    "lambada_openai": ("lambada_openai.jsonl", "lm"),
}
ALIASES = {"arc_e": "arc_easy", "arc_c": "arc_challenge", "lambada": "lambada_openai"}
DEFAULT_TASKS = tuple(TASKS)
MC_DELIMITER = "\nAnswer:"


def default_tasks_dir() -> Path | None:
    """``$GQSA_TASKS_DIR``, else the shared assets' ``data/zeroshot`` beside (or above) the working
    directory, else None."""
    env = os.environ.get("GQSA_TASKS_DIR")
    if env:
        return Path(env)
    for base in (Path.cwd(), *Path.cwd().parents):
        cand = base / ".." / "shared" / "assets" / "data" / "zeroshot"
        if cand.is_dir():
            return cand.resolve()
        if base.parent == base:
            break
    return None


def resolve_task(task: str, tasks_dir=None) -> tuple[str, Path, str]:
    """``(name, path, kind)`` of a task given by name (``piqa``, ``arc_e``, …) or by a ``.jsonl`` path
    whose stem is a known task name."""
    path = Path(task)
    if path.suffix == ".jsonl":
        name = ALIASES.get(path.stem, path.stem)
        if name not in TASKS:
            raise ValueError(f"{task}: unknown task file; its name must be one of {', '.join(TASKS)}")
        if not path.is_file():
            raise FileNotFoundError(f"{task}: no such task file")
        return name, path, TASKS[name][1]
    name = ALIASES.get(task, task)
    if name not in TASKS:
        raise ValueError(f"unknown zero-shot task '{task}': use one of {', '.join(TASKS)} (or a .jsonl path)")
    folder = Path(tasks_dir) if tasks_dir else default_tasks_dir()
    if folder is None:
        raise FileNotFoundError(f"no folder of task files for '{task}': pass --tasks-dir (the assets' "
                                f"data/zeroshot) or set GQSA_TASKS_DIR")
    path = folder / TASKS[name][0]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: task file not found (pass --tasks-dir)")
    return name, path, TASKS[name][1]


# the fields a document of each kind needs (requests_for)
FIELDS = {"mc": ("query", "choices"), "schema": ("context_options", "continuation"), "lm": ("context", "continuation")}


def load_docs(path, limit: int | None = None, kind: str | None = None) -> list[dict]:
    """The first ``limit`` rows of a task file (all when None); ``ValueError`` naming the file and line for a line
    that is not a JSON object (with ``kind``'s fields, when given), and for a file without documents."""
    docs = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {number}: not JSON ({e})") from None
            if not isinstance(doc, dict):
                raise ValueError(f"{path} line {number}: not a JSON object")
            missing = [k for k in FIELDS.get(kind, ()) if k not in doc]
            if missing:
                raise ValueError(f"{path} line {number}: a document of this task needs {', '.join(FIELDS[kind])}; "
                                 f"{', '.join(missing)} missing")
            docs.append(doc)
            if limit is not None and len(docs) >= limit:
                break
    if not docs:
        raise ValueError(f"{path}: no documents in the task file")
    return docs


def requests_for(doc: dict, kind: str) -> list[tuple[str, str]]:
    """The ``(context, continuation)`` pairs one document is scored by."""
    if kind == "mc":
        ctx = doc["query"].rstrip() + MC_DELIMITER
        return [(ctx, " " + str(c).strip()) for c in doc["choices"]]
    if kind == "schema":
        cont = " " + doc["continuation"].strip()
        return [(opt.rstrip(), cont) for opt in doc["context_options"]]
    if kind == "lm":
        return [(doc["context"].rstrip(), " " + doc["continuation"].strip())]
    raise ValueError(f"unknown task kind '{kind}'")


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's ``_encode_pair``: context ids (with BOS when the tokenizer adds one) and
    continuation ids, split from the tokenization of the whole string."""
    n_space = len(context) - len(context.rstrip())
    if n_space:
        continuation = context[-n_space:] + continuation
        context = context[:-n_space]
    whole = tokenizer(context + continuation, add_special_tokens=True).input_ids
    ctx = tokenizer(context, add_special_tokens=True).input_ids
    if hasattr(whole, "tolist"):
        whole, ctx = whole.tolist(), ctx.tolist()
    if whole and isinstance(whole[0], list):
        whole, ctx = whole[0], ctx[0]
    cont = whole[len(ctx):]
    if not cont:  # the context's last token absorbed the continuation: score it on its own
        cont = tokenizer(continuation, add_special_tokens=False).input_ids
        cont = cont.tolist() if hasattr(cont, "tolist") else cont
        cont = cont[0] if cont and isinstance(cont[0], list) else cont
        return list(ctx), list(cont)
    return list(ctx), list(cont)


@torch.no_grad()
def loglikelihoods(model, tokenizer, pairs: list[tuple[str, str]], batch_size: int = 16,
                   max_length: int | None = None, device=None, progress: bool = False,
                   desc: str = "loglikelihood") -> list[tuple[float, bool, int]]:
    """For each ``(context, continuation)``: (sum of the continuation's token log-probabilities,
    whether greedy decoding reproduces it, its token count)."""
    device = device or next(model.parameters()).device
    max_length = max_length or model_context(model, cap=4096)
    encoded = []
    for ctx, cont in pairs:
        c, t = encode_pair(tokenizer, ctx, cont)
        seq = (c + t)[-(max_length + 1):]
        n_cont = min(len(t), len(seq) - 1)
        encoded.append((seq, n_cont))
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    results: list[tuple[float, bool, int] | None] = [None] * len(encoded)
    keep_arg = "logits_to_keep" in inspect.signature(model.forward).parameters
    starts = range(0, len(order), batch_size)
    for s in tqdm(starts, desc=desc, unit="batch", disable=not progress):
        idx = order[s:s + batch_size]
        width = max(len(encoded[i][0]) - 1 for i in idx)
        inp = torch.zeros(len(idx), width, dtype=torch.long)
        for r, i in enumerate(idx):
            seq = encoded[i][0][:-1]
            inp[r, :len(seq)] = torch.tensor(seq)
        # only the positions that predict continuation tokens need the vocabulary projection
        first = min(len(encoded[i][0]) - 1 - encoded[i][1] for i in idx)
        if keep_arg:
            logits = model(inp.to(device), use_cache=False, logits_to_keep=width - first).logits
        else:
            logits = model(inp.to(device), use_cache=False).logits[:, first:]
        for r, i in enumerate(idx):
            seq, n = encoded[i]
            end = len(seq) - 1 - first  # positions 0..end-1 predict tokens 1..end (offset by `first`)
            lp = torch.log_softmax(logits[r, end - n:end].float(), dim=-1)
            target = torch.tensor(seq[-n:], device=lp.device)
            ll = lp.gather(1, target[:, None]).sum().item()
            greedy = bool((lp.argmax(-1) == target).all())
            results[i] = (ll, greedy, n)
    return results  # type: ignore[return-value]


def score_task(kind: str, docs: list[dict], pairs_per_doc: list[list[tuple[str, str]]],
               lls: list[tuple[float, bool, int]]) -> dict:
    """Metrics of one task from the per-request log-likelihoods (in request order)."""
    it = iter(lls)
    correct = correct_norm = 0
    lambada_lls = []
    for doc, pairs in zip(docs, pairs_per_doc):
        res = [next(it) for _ in pairs]
        if kind == "lm":
            ll, greedy, _ = res[0]
            correct += int(greedy)
            lambada_lls.append(ll)
            continue
        gold = int(doc["gold"])
        scores = [r[0] for r in res]
        correct += int(max(range(len(scores)), key=scores.__getitem__) == gold)
        if kind == "mc":
            # per character of the choice itself, without the space before it (the harness's completion_len)
            norm = [r[0] / max(1, len(p[1]) - p[1].startswith(" ")) for r, p in zip(res, pairs)]
            correct_norm += int(max(range(len(norm)), key=norm.__getitem__) == gold)
    n = len(docs)
    out = {"n": n, "acc": correct / n if n else float("nan")}
    if kind == "mc":
        out["acc_norm"] = correct_norm / n if n else float("nan")
    if kind == "lm":
        out["ppl"] = math.exp(-sum(lambada_lls) / n) if n else float("nan")
    return out


def evaluate_task(model, tokenizer, task: str, tasks_dir=None, limit: int | None = None, batch_size: int = 16,
                  progress: bool = False) -> dict:
    """Metrics of one task (``acc``, plus ``acc_norm`` for multiple choice, ``ppl`` for LAMBADA)."""
    t0 = time.perf_counter()
    name, path, kind = resolve_task(task, tasks_dir)
    docs = load_docs(path, limit, kind)
    pairs_per_doc = [requests_for(d, kind) for d in docs]
    flat = [p for pairs in pairs_per_doc for p in pairs]
    lls = loglikelihoods(model, tokenizer, flat, batch_size=batch_size, progress=progress, desc=name)
    out = {"task": name, "file": str(path), **score_task(kind, docs, pairs_per_doc, lls)}
    out["limit"] = limit
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


def evaluate_zeroshot(model, tokenizer, tasks=DEFAULT_TASKS, tasks_dir=None, limit: int | None = None,
             batch_size: int = 16, progress: bool = True) -> dict:
    """Evaluate several tasks; returns ``{"tasks": {name: metrics}, "avg_acc": mean acc, "limit"}``."""
    results = {}
    for task in tasks:
        r = evaluate_task(model, tokenizer, task, tasks_dir, limit, batch_size, progress)
        results[r["task"]] = r
    accs = [r["acc"] for r in results.values()]
    return {"tasks": results, "avg_acc": sum(accs) / len(accs) if accs else float("nan"), "limit": limit,
            "backend": "gqsa-local"}
