"""The trained stages of GQSA, after the one-shot step (:mod:`gqsa.pipeline`):

* :mod:`gqsa.stages.bqpo` — BQPO, block-wise training of latent weights and ``s, z`` through fake
  quantization with the mask held, one block on the device at a time, resumable per block;
* :mod:`gqsa.stages.e2e` — E2E-OQP, end-to-end training of the scales (and optionally the zero
  points) with the integer codes and the mask frozen.

Both are driven by :func:`gqsa.pipeline.compress_model` through ``GQSAConfig.stages``.
"""
from .bqpo import FakeQuantLinear, run_bqpo, train_block
from .e2e import ScaleTrainableLinear, run_e2e
from .workdir import BlockStore

__all__ = ["BlockStore", "FakeQuantLinear", "ScaleTrainableLinear", "run_bqpo", "run_e2e", "train_block"]
