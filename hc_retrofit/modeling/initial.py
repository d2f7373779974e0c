"""The initial coefficients of a site: exact at init, and streams that can diverge.

With ``expand`` = copy into n streams and ``reduce`` = mean, a converted model computes the
original function iff ``sum_k a_k = 1``, every ``b_j = 1`` and every row of ``R`` sums to 1. All
inits below satisfy this, and none is uniform in ``a`` (that would lock all streams into
identical gradients: the *symmetry lock*). Sinkhorn ends on a row normalisation, so ``R`` stays
exactly row-stochastic (the property exactness needs) whatever the number of iterations.
"""

from __future__ import annotations

import math

import torch

__all__ = ["initial_residual_logits", "initial_width"]


def initial_width(num_streams: int, main: float, site_index: int) -> torch.Tensor:
    """Initial ``a``: ``main`` on stream ``site_index mod n``, the rest shared equally (sum 1).

    Rotating the favoured stream across sites (``e_(site mod n)`` when ``main = 1``, as in the HC
    paper) breaks the symmetry between streams, so they receive different gradients and diverge.
    """
    rest = (1.0 - main) / (num_streams - 1)
    a = torch.full((num_streams,), rest, dtype=torch.float32)
    a[site_index % num_streams] = main
    return a


def initial_residual_logits(num_streams: int, diagonal: float) -> torch.Tensor:
    """Logits whose Sinkhorn projection is ``diagonal`` on the diagonal, the rest shared equally.

    A matrix with a constant diagonal and constant off-diagonal is already doubly stochastic, so
    the projection is exact after any number of iterations. A diagonal below 1 (0.9 by default)
    keeps the exp/Sinkhorn gradients alive (identity needs infinite logits, whose gradients
    vanish), while not too low a value keeps the off-diagonal mixing from averaging the streams
    back together at every site (spread shrinks by ``diag - off`` per site).
    """
    off = (1.0 - diagonal) / (num_streams - 1)
    logits = torch.zeros(num_streams, num_streams, dtype=torch.float32)
    logits.fill_diagonal_(math.log(diagonal / off))
    return logits
