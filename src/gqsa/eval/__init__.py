"""Evaluation: perplexity (GPTQ protocol), zero-shot log-likelihood tasks (local files, or the
lm-eval harness when installed) and fidelity to the uncompressed model (KL, top-1 agreement)."""
from .fidelity import evaluate_fidelity
from .ppl import perplexity
from .zeroshot import DEFAULT_TASKS, evaluate_task, evaluate_zeroshot, loglikelihoods

__all__ = ["DEFAULT_TASKS", "evaluate_fidelity", "evaluate_task", "evaluate_zeroshot", "loglikelihoods", "perplexity"]
