"""Integrations of GQSA checkpoints with other libraries.

* :mod:`gqsa.integrations.transformers` — ``AutoModelForCausalLM.from_pretrained(folder)`` loads a GQSA
  checkpoint folder with :class:`~gqsa.nn.GQSALinear` layers (registered when ``gqsa`` is imported).
"""
from .transformers import GQSAHfQuantizer, GQSAQuantizationConfig, register

__all__ = ["GQSAHfQuantizer", "GQSAQuantizationConfig", "register"]
