"""The same zero-shot tasks through EleutherAI's lm-evaluation-harness, on the in-memory model
(``HFLM(pretrained=model, tokenizer=tokenizer)``), so the numbers are the ones papers report.

``lm_eval`` is optional (``pip install gqsa[eval]``); the harness downloads its datasets from the
Hugging Face hub, so this path needs network access (or a populated datasets cache).
"""
from __future__ import annotations

import time

# our task names -> the harness's
HARNESS_TASKS = {
    "piqa": "piqa", "arc_easy": "arc_easy", "arc_challenge": "arc_challenge", "boolq": "boolq",
    "winogrande": "winogrande", "lambada_openai": "lambada_openai", "hellaswag": "hellaswag",
    "arc_e": "arc_easy", "arc_c": "arc_challenge", "lambada": "lambada_openai",
}
DEFAULT_HARNESS_TASKS = ("piqa", "arc_easy", "arc_challenge", "boolq", "winogrande", "hellaswag", "lambada_openai")


def available() -> bool:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return False
    return True


def run_lm_eval(model, tokenizer, tasks=DEFAULT_HARNESS_TASKS, limit: int | None = None, batch_size: int = 16,
                num_fewshot: int = 0) -> dict:
    """Run the harness on ``model``; returns ``{"tasks": {name: {"acc", "acc_norm"?, "ppl"?, ...}},
    "avg_acc", "limit", "backend": "lm-eval <version>"}`` (the raw harness numbers per task too)."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as e:
        raise ValueError("the lm-eval harness is not installed: pip install 'lm-eval>=0.4' "
                         "(or use the built-in local tasks)") from e
    t0 = time.perf_counter()
    names = [HARNESS_TASKS.get(t, t) for t in tasks]
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    out = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit)
    results = {}
    for name in names:
        raw = out["results"].get(name, {})
        r = {"task": name, "raw": {k: v for k, v in raw.items() if isinstance(v, (int, float, str))}}
        for metric, key in (("acc", "acc"), ("acc_norm", "acc_norm"), ("ppl", "perplexity")):
            for k, v in raw.items():
                if k.split(",")[0] == key and isinstance(v, (int, float)):
                    r[metric] = float(v)
        results[name] = r
    accs = [r["acc"] for r in results.values() if "acc" in r]
    try:
        from importlib.metadata import version

        backend = f"lm-eval {version('lm_eval')}"
    except Exception:
        backend = "lm-eval"
    return {"tasks": results, "avg_acc": sum(accs) / len(accs) if accs else float("nan"), "limit": limit,
            "num_fewshot": num_fewshot, "backend": backend, "seconds": round(time.perf_counter() - t0, 2)}
