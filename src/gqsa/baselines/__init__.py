"""Baselines for side-by-side comparisons with GQSA, each from its paper: RTN and GPTQ (weight
quantization), Wanda, SparseGPT and magnitude pruning (unstructured and n:m, fp16 values).

Per layer: :func:`rtn_layer`, :func:`gptq_layer`, :func:`wanda_layer`, :func:`sparsegpt_layer`,
:func:`magnitude_layer`. Whole model: :func:`compress_model_baseline` with a
:class:`BaselineConfig`; command line: ``gqsa compress --method …`` (:func:`gqsa.workflow.compress_to_folder`).
"""
from .gptq import gptq_layer
from .magnitude import magnitude_layer
from .masks import metadata_bits, nm_mask, parse_pattern, unstructured_mask
from .rtn import rtn_layer
from .runner import (METHODS, PRUNE_METHODS, QUANT_METHODS, BaselineConfig, BaselineResult,
                     compress_layer, compress_model_baseline, save_dense)
from .sparsegpt import sparsegpt_layer
from .wanda import wanda_layer, wanda_score

__all__ = [
    "BaselineConfig", "BaselineResult", "METHODS", "PRUNE_METHODS", "QUANT_METHODS",
    "compress_layer", "compress_model_baseline", "gptq_layer", "magnitude_layer", "metadata_bits", "nm_mask",
    "parse_pattern", "rtn_layer", "save_dense", "sparsegpt_layer", "unstructured_mask", "wanda_layer",
    "wanda_score",
]
