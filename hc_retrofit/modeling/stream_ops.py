"""The stream operations, each on the fastest path the context allows.

``expand``/``reduce`` (into and out of ``n`` streams), the width connection ``x = a . H``, the
mix ``R H``, ``b (x) y`` and the depth connection ``R H + b (x) y``, and the RMS projection the
dynamic coefficients read. Each picks one of three implementations of the same equation:

* under ``torch.compile``: the formula (:mod:`hc_retrofit.formulas`), which the compiler fuses;
* with autograd: the fast Functions of :mod:`hc_retrofit.kernels`;
* without autograd (evaluation, ``generate()``): one or two plain torch ops. At decode (batch 1,
  one token: tensors of ``n x D``) the Functions' per-call overhead would be most of the HC cost.
"""

from __future__ import annotations

import torch

from .formulas import depth as plain_depth
from .formulas import mix as plain_mix
from .formulas import outer as plain_outer
from .formulas import rms_project as plain_rms_project
from .formulas import width as plain_width
from .kernels import DepthConnection, Outer, WidthConnection, cast, expanded_streams
from .projection import project_passing
from .projection import rms_project_parts as _rms_project_parts

__all__ = [
    "depth_connection",
    "expand_streams",
    "outer_streams",
    "reduce_streams",
    "rms_project",
    "stream_mix",
    "width_connection",
]


def expand_streams(h: torch.Tensor, num_streams: int) -> torch.Tensor:
    """``(..., D) -> (..., n, D)``: n copies of ``h``, as a broadcast view (no memory copied)."""
    return h.unsqueeze(-2).expand(*h.shape[:-1], num_streams, h.shape[-1])


def reduce_streams(streams: torch.Tensor) -> torch.Tensor:
    """``(..., n, D) -> (..., D)``: the mean over streams (the inverse of :func:`expand_streams`)."""
    return streams.mean(dim=-2)


def width_connection(streams: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``x = sum_k a_k H_k``; ``a`` is ``(n,)`` (static) or ``(..., n)`` (per token)."""
    if torch.compiler.is_compiling():
        return plain_width(streams, a)
    if not torch.is_grad_enabled():
        return _width_no_grad(streams, a)
    return WidthConnection.apply(streams, a)


def stream_mix(streams: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``(R H)_j = sum_k R_jk H_k``; ``R`` is ``(n, n)`` or ``(..., n, n)``."""
    if torch.compiler.is_compiling():
        return plain_mix(streams, r)
    if not torch.is_grad_enabled():
        return _mix_no_grad(streams, r)
    return DepthConnection.apply(streams, r, None, None)


def depth_connection(streams: torch.Tensor, r: torch.Tensor, b: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``H'_j = sum_k R_jk H_k + b_j y``; ``b`` is ``(n,)`` or ``(..., n)``, ``y`` is ``(..., D)``."""
    if torch.compiler.is_compiling():
        return plain_depth(streams, r, b, y)
    if not torch.is_grad_enabled():
        b, y = cast(b, streams.dtype), cast(y, streams.dtype)
        return _mix_no_grad(streams, r).addcmul_(b.unsqueeze(-1), y.unsqueeze(-2))
    return DepthConnection.apply(streams, r, b, y)


def outer_streams(b: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``b_j y`` for every stream j: ``(n,)`` or ``(..., n)`` with ``(..., D)`` -> ``(..., n, D)``."""
    if torch.compiler.is_compiling():
        return plain_outer(b, y)
    if not torch.is_grad_enabled():
        return cast(b, y.dtype).unsqueeze(-1) * y.unsqueeze(-2)
    return Outer.apply(b, y)


def rms_project(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``RMSNorm(x) @ w`` over the last dim of ``x``, in (at least) float32: the dynamic coefficients' input."""
    if torch.compiler.is_compiling():
        return plain_rms_project(x, w)
    if not torch.is_grad_enabled():
        p, inv = _rms_project_parts(x, w)
        return p.mul_(inv)
    return project_passing(x, w)[0]


def _width_no_grad(streams: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    a = cast(a, streams.dtype)
    if expanded_streams(streams):
        return streams[..., 0, :] * a.sum(-1, keepdim=True)
    if a.dim() == 1:
        return torch.matmul(a, streams)
    return torch.matmul(a.unsqueeze(-2), streams).squeeze(-2)


def _mix_no_grad(streams: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    r = cast(r, streams.dtype)
    if expanded_streams(streams):
        return r.sum(-1, keepdim=True) * streams[..., :1, :]
    return torch.matmul(r, streams)
