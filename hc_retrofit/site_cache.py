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

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from hc_retrofit.kernels import cast


def cache_key(params: Iterable[torch.Tensor], *extra: object) -> tuple | None:
    """What identifies the parameters' current values, or ``None`` if they cannot be tracked."""
    params = list(params)
    if any(p.is_inference() for p in params):
        return None
    return (*extra, *((id(p), p._version, p.data_ptr()) for p in params))


@dataclass
class StaticParts:
    """A site's coefficients without ``H``: ``a, R, b`` (static site) or their input-independent
    part (dynamic site), and for dynamic sites ``base``, ``scale`` and the projection ``proj``
    (detached: cheaper ops) of ``base + scale * project(H)``. ``casts``: ``(a, R, b)`` and
    ``(a, R - I, b)`` per dtype, made on first use."""

    key: tuple | None
    pinned: tuple  # the parameters of ``key`` (ids and storages stay unique while cached)
    a: torch.Tensor
    r: torch.Tensor
    b: torch.Tensor
    base: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    proj: torch.Tensor | None = None
    casts: dict = field(default_factory=dict)

    def cast(self, dtype: torch.dtype, minus_identity: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(a, R, b)`` or ``(a, R - I, b)`` in ``dtype``."""
        key = (dtype, minus_identity)
        if key not in self.casts:
            a, r, b = cast(self.a, dtype), cast(self.r, dtype), cast(self.b, dtype)
            if minus_identity:
                r = r - torch.eye(r.shape[-1], device=r.device, dtype=dtype)
            self.casts[key] = (a, r, b)
        return self.casts[key]
