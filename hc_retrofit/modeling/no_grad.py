"""A site's per-token coefficients without autograd (evaluation, ``generate()``), in few operator calls.

Without autograd a site applies ``[a; R]`` (``[a; R - I]`` where the layer adds ``H`` itself) to its
streams in one product, so the functions here return that ``(..., n + 1, n)`` matrix and ``b``,
computed by the equations of :mod:`.formulas` from the input-independent layout the site caches
(:class:`~.site_cache.StaticParts`):

* dynamic HC: row ``k`` of the table is ``[a_k, R_.k, b_k] = base_k + s * tanh(RMSNorm(H_k) W)``;
* mHC: the logits ``base + s * (RMSNorm(vec H) phi)`` are one ``linear`` and one ``addcdiv`` (``s``
  folded into the cached ``phi``: ``(x phi) s = x (phi s)``), then ``a = sigmoid``, ``b = 2 sigmoid``
  and ``R = Sinkhorn(exp)``.

At decode (batch 1, one token: tensors of ``n x D``) each operator call costs its dispatch, far more
than its arithmetic: the norm is one ``vector_norm`` and one ``hypot`` applied to the projection's
few outputs (:func:`normed_projection`; ``rms_norm`` scales all ``D`` inputs in several kernels), the
projection one ``linear``, and a caller holding one token passes its streams as an ``(n, D)`` matrix,
so every product is a plain 2-D one.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from .formulas import hc_dynamic_table
from .kernels import at_least_float32, cast
from .sinkhorn_knopp import sinkhorn
from .site_cache import StaticParts

__all__ = ["hc_rows", "mhc_rows"]


def normed_projection(x: torch.Tensor, w_t: torch.Tensor, root: torch.Tensor) -> torch.Tensor:
    """``RMSNorm(x) W`` over the last dim of ``x`` (in at least float32), from the cached ``sqrt(D) W^T``
    and ``sqrt(D eps)`` (:meth:`~.site_cache.StaticParts.hc_layout`): ``RMSNorm(x) = x / sqrt(|x|^2 / D + eps)``
    is ``sqrt(D) x / hypot(|x|, sqrt(D eps))``, so the norm is one ``vector_norm`` and one ``hypot`` and
    the scaling happens on the ``k`` outputs, not the ``D`` inputs."""
    xf = at_least_float32(x)
    return F.linear(xf, w_t).div_(_norm_floor(xf, root))


def _norm_floor(x: torch.Tensor, root: torch.Tensor) -> torch.Tensor:
    """``hypot(|x|, root)`` over the last dim, kept."""
    return torch.linalg.vector_norm(x, dim=-1, keepdim=True).hypot_(root)


def hc_rows(
    parts: StaticParts, streams: torch.Tensor, dtype: torch.dtype, minus_identity: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic HC's ``[a; R]`` ``(..., n + 1, n)`` and ``b`` ``(..., n)`` for ``streams`` ``(..., n, D)``, in ``dtype``."""
    base, scale, w_t, root = parts.hc_layout(minus_identity)
    table = hc_dynamic_table(base, scale, w_t, streams, lambda x, w: normed_projection(x, w, root))
    table = cast(table, dtype)  # (..., n, n + 2)
    n = table.shape[-2]
    return table.narrow(-1, 0, n + 1).transpose(-1, -2), table.select(-1, n + 1)


def mhc_rows(
    parts: StaticParts, streams: torch.Tensor, iters: int, dtype: torch.dtype, minus_identity: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """mHC's ``[a; R]`` ``(..., n + 1, n)`` and ``b`` ``(..., n)`` for ``streams`` ``(..., n, D)``, in ``dtype``."""
    n = streams.shape[-2]
    base, phi_t, root = parts.mhc_layout()
    lead = streams.shape[:-2]
    vec = at_least_float32(streams.reshape(*lead, 1, -1))  # (..., 1, n D): vec H, a row per token
    # base + s (RMSNorm(vec H) phi), s folded into phi: one addcdiv of the projection by the norm
    logits = torch.addcdiv(base, F.linear(vec, phi_t), _norm_floor(vec, root))  # (..., 1, 2n + n^2)
    # .formulas.mhc's a, R, b, on logits kept as a row: for one token every product stays 2-D, and
    # ``a`` is already the first row of [a; R] (calling it would add views at every site).
    a_b = torch.sigmoid(logits.narrow(-1, 0, 2 * n))
    r = sinkhorn(logits.narrow(-1, 2 * n, n * n).reshape(*lead, n, n), iters)
    if minus_identity:
        r = r - parts.eye()
    rows = cast(torch.cat([a_b.narrow(-1, 0, n), r], dim=-2), dtype)
    return rows, cast(a_b.narrow(-1, n, n).squeeze(-2) * 2, dtype)
