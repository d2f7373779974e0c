"""The no-grad cache of a site's input-independent coefficients (evaluation, ``generate()``).

At decode a site's static coefficients (``a, R, b``; mHC's sigmoid and Sinkhorn of them; dynamic
variants' base and scales in the projection's layout) would be recomputed per token from
parameters that do not change. :class:`StaticParts` keeps them, keyed on every parameter's version
counter (bumped by every in-place update: optimizer steps, ``load_state_dict``, ``p.copy_()``
under ``no_grad``) and storage (``.to()``, ``p.data = t``). Writes *through* ``p.data``
(``p.data.add_()``) bypass the version counter: after those, call ``clear_cache()`` on the site.
Parameters created under ``inference_mode`` have no version counter: nothing is cached.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .formulas import EPS
from .kernels import cast
from .private_api import version_counters


def cache_key(params: list[torch.Tensor], *extra: object) -> tuple | None:
    """What identifies the parameters' current values, or ``None`` if they cannot be tracked."""
    try:  # (few calls: this runs per site and token at decode)
        versions = version_counters(params)
    except RuntimeError:  # inference tensors have no version counter
        return None
    return (*extra, *map(id, params), *versions, *[p.data_ptr() for p in params])


@dataclass
class StaticParts:
    """A site's coefficients without ``H``: ``a, R, b`` (static site) or their input-independent
    part (dynamic site), and for dynamic sites ``base``, ``scale`` and the projection ``proj``
    (detached: cheaper ops) of ``base + scale * project(H)``. What one call applies is derived
    from these on first use and kept in ``derived`` (e.g. ``[a; R - I]`` in bfloat16)."""

    key: tuple | None
    pinned: tuple  # the parameters of ``key`` (ids and storages stay unique while cached)
    a: torch.Tensor
    r: torch.Tensor
    b: torch.Tensor
    base: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    proj: torch.Tensor | None = None
    derived: dict = field(default_factory=dict)

    def rows(self, dtype: torch.dtype, minus_identity: bool) -> tuple[torch.Tensor, ...]:
        """``[a; R]`` (or ``[a; R - I]``) as one ``(n + 1, n)`` matrix, its rows ``a`` and ``R`` (or
        ``R - I``), and ``b``, in ``dtype``: one product with ``H`` gives the branch input ``a . H``
        and the mix ``R H`` together."""
        key = ("rows", dtype, minus_identity)
        if key not in self.derived:
            r = self.r - eye_like(self.r) if minus_identity else self.r
            rows = cast(torch.cat([self.a.unsqueeze(0), r]), dtype)
            self.derived[key] = (rows, rows[0], rows[1:], cast(self.b, dtype))
        return self.derived[key]

    def hc_base(self, minus_identity: bool) -> torch.Tensor:
        """Dynamic HC's ``base`` (row ``k``: ``[a_k, R_.k, b_k]``), with ``R - I`` if ``minus_identity``."""
        if not minus_identity:
            return self.base
        key = ("hc_base", True)
        if key not in self.derived:
            n = self.base.shape[-2]
            base = self.base.clone()
            base[:, 1 : n + 1] -= eye_like(base[:, 1 : n + 1])
            self.derived[key] = base
        return self.derived[key]

    def hc_layout(self, minus_identity: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Dynamic HC's ``base`` (:meth:`hc_base`), ``s``, the projection as ``sqrt(D) W^T`` ``(n + 2, D)``
        contiguous and ``sqrt(D eps)``: ``RMSNorm(x) W = F.linear(x, sqrt(D) W^T) / hypot(|x|, sqrt(D eps))``
        (see :func:`~.no_grad.normed_projection`)."""
        key = ("hc_layout", minus_identity)
        if key not in self.derived:
            w_t, root = _scaled_transpose(self.proj)
            self.derived[key] = (self.hc_base(minus_identity), self.scale, w_t, root)
        return self.derived[key]

    def mhc_layout(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """mHC's ``base``, ``sqrt(n D) (phi s)^T`` ``(2n + n^2, n D)`` and ``sqrt(n D eps)``: the logits
        ``base + s (RMSNorm(vec H) phi)`` are then ``base + F.linear(vec H, .) / hypot(|vec H|, .)``."""
        if "mhc_layout" not in self.derived:
            w_t, root = _scaled_transpose(self.proj * self.scale)
            self.derived["mhc_layout"] = (self.base, w_t, root)
        return self.derived["mhc_layout"]

    def eye(self) -> torch.Tensor:
        """``I`` (``n x n``, float32)."""
        if "eye" not in self.derived:
            self.derived["eye"] = eye_like(self.r)
        return self.derived["eye"]


def _scaled_transpose(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``sqrt(D) w^T`` (contiguous) and ``sqrt(D eps)`` (on ``w``'s device) for a ``(D, k)`` projection."""
    d = w.shape[0]
    return (w.t() * d**0.5).contiguous(), torch.full((), (d * EPS) ** 0.5, dtype=w.dtype, device=w.device)


def eye_like(r: torch.Tensor) -> torch.Tensor:
    """The identity of ``r``'s (trailing) size, dtype and device."""
    return torch.eye(r.shape[-1], device=r.device, dtype=r.dtype)
