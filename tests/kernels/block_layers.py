"""Random packed layers whose masks are shared by blocks of rows (``--allocation blockR`` / ``clusterR``), for
the block kernels' tests (``test_block.py``) and the hand-written kernel's (``test_mma.py``)."""
from __future__ import annotations

import math

import torch

from gqsa import format as fmt
from gqsa import quant


def make_block_packed(n, k, g, bits=4, sparsity=0.5, float_zeros=False, rows=16, uneven=False, seed=0, cluster=False,
                      min_keep=1):
    """A packed layer whose every ``rows``-row block keeps the same group columns; ``uneven``: blocks
    keep different numbers of groups (one block none at all); ``cluster``: the blocks' rows shuffled (a layer for
    a row map); ``min_keep``: the fewest groups a block keeps otherwise."""
    gen = torch.Generator().manual_seed(seed)
    c = math.ceil(k / g)
    w = torch.randn(n, c, g, generator=gen)
    valid = (torch.arange(c * g).reshape(c, g) < k)[None]
    s, z = quant.minmax_params(w, bits, valid=valid)
    if float_zeros:
        z = z + torch.rand(z.shape, generator=gen) * 0.8 - 0.4
    q = quant.quantize(w, s, z, bits)
    nb = -(-n // rows)
    if uneven:
        bmask = torch.rand(nb, c, generator=gen) < torch.linspace(0.1, 0.95, nb)[:, None]
        bmask[nb // 2] = False
    else:
        keep = max(min_keep, round((1 - sparsity) * c))
        bmask = torch.zeros(nb, c, dtype=torch.bool)
        bmask.scatter_(1, torch.rand(nb, c, generator=gen).argsort(1)[:, :keep], True)
    mask = bmask.repeat_interleave(rows, 0)[:n]
    if cluster:
        mask = mask[torch.randperm(n, generator=gen)]
    p = fmt.pack(q, s, z, mask, (n, k), bits, g, float_zeros=float_zeros)
    p.validate()
    return p
