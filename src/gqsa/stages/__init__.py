"""The trained stages of GQSA, after the one-shot step (:mod:`gqsa.pipeline`):

* :mod:`gqsa.stages.bqpo` — BQPO, block-wise training of latent weights and ``s, z`` through fake
  quantization with the mask held, one block on the device at a time, resumable per block;
* :mod:`gqsa.stages.e2e` — E2E-OQP, end-to-end training of the scales, the kept weights' integer codes
  (straight-through rounding; ``e2e_lr_codes``, 0 freezes them) and optionally the zero points, with the
  mask frozen.

Their training-time linears live in :mod:`gqsa.stages.trainable`, what both share in
:mod:`gqsa.stages.common`, the per-block work folder in :mod:`gqsa.stages.workdir`. Both are driven by
:func:`gqsa.pipeline.compress_model` through ``GQSAConfig.stages``.
"""
from .bqpo import run_bqpo, train_block
from .e2e import run_e2e
from .trainable import FakeQuantLinear, ScaleTrainableLinear
from .workdir import BlockStore

__all__ = ["BlockStore", "FakeQuantLinear", "ScaleTrainableLinear", "run_bqpo", "run_e2e", "train_block"]
