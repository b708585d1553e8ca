"""Evaluation: perplexity (GPTQ protocol); zero-shot and fidelity come later."""
from .ppl import perplexity

__all__ = ["perplexity"]
