"""The same zero-shot tasks through EleutherAI's lm-evaluation-harness, on the in-memory model
(``HFLM(pretrained=model, tokenizer=tokenizer)``), so the numbers are the ones papers report.

``lm_eval`` is optional (``pip install gqsa[eval]``); the harness downloads its datasets from the
Hugging Face hub, so its named tasks need network access (or a populated datasets cache). A task may
also be given as the path of an lm-eval task YAML (``task: NAME`` plus, e.g., ``dataset_path: json`` and
``dataset_kwargs: {data_files: {test: /path/docs.jsonl}}``): its folder is added to the harness's task
paths, and such a task runs offline.

The harness is run with the tokenizer's own special tokens (a BOS first when it adds one), as
:mod:`gqsa.eval.zeroshot` does, so a task defined the same way scores the same in both.
"""
from __future__ import annotations

import re
import time
from pathlib import Path

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


def yaml_task(path) -> tuple[str, str]:
    """(task name, folder) of an lm-eval task YAML file (its top-level ``task:`` key)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{path}: no such lm-eval task file")
    m = re.search(r"^task:\s*['\"]?([^'\"\s#]+)", p.read_text(encoding="utf-8"), re.MULTILINE)
    if m is None:
        raise ValueError(f"{path}: not an lm-eval task file (no top-level 'task: NAME' line)")
    return m.group(1), str(p.resolve().parent)


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
    from lm_eval.tasks import TaskManager

    t0 = time.perf_counter()
    names, include = [], []
    for t in tasks:
        if str(t).endswith((".yaml", ".yml")):
            name, folder = yaml_task(t)
            names.append(name)
            if folder not in include:
                include.append(folder)
        else:
            names.append(HARNESS_TASKS.get(t, t))
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    manager = TaskManager(include_path=include or None)
    out = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit,
                                  task_manager=manager)
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
