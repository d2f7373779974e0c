"""`HCConfig`: the hyper-connection settings, validated, with a JSON round trip.

The config is stored in a converted checkpoint's ``config.json`` (key ``hc_retrofit``), so every
field is a plain JSON value and :meth:`HCConfig.from_dict` ignores nothing silently: unknown keys
are an error, because they usually mean a typo or a checkpoint written by a newer version.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

CONFIG_KEY = "hc_retrofit"
"""``config.json`` key of a converted checkpoint: its :class:`HCConfig` settings."""
MODEL_TYPE_PREFIX = "hc_retrofit_"
"""A converted checkpoint's ``model_type`` is this prefix + its base's (unknown to plain transformers)."""
BASE_TYPE_KEY = "hc_retrofit_base_model_type"
"""``config.json`` key: the base model's ``model_type``."""
BASE_ARCH_KEY = "hc_retrofit_base_architecture"
"""``config.json`` key: the base model's class name."""

VARIANTS = ("static", "dynamic", "mhc")


MAX_STREAMS = 64
"""Upper bound on ``num_streams``: beyond it the n-fold residual state is a mistake, not a setting."""
MAX_SINKHORN_ITERS = 1000
"""Upper bound on ``sinkhorn_iters`` (a crafted config must not hang a command)."""


@dataclass(frozen=True)
class HCConfig:
    """Settings of a hyper-connection retrofit.

    Attributes:
        num_streams: ``n``, the number of residual streams (>= 2).
        variant: ``"static"`` (learned a, R, b; paper 2409.19606 SHC), ``"dynamic"`` (adds
            ``s * tanh(norm(H) W)`` with ``W = 0`` at init; DHC) or ``"mhc"`` (manifold-constrained:
            ``a = sigmoid``, ``b = 2 sigmoid``, ``R = Sinkhorn(exp)``; paper 2512.24880).
        mhc_dynamic: for ``"mhc"``, add the paper's input-dependent term ``alpha * (norm(vec H) phi)``
            (``phi = 0`` at init). ``False`` gives static mHC, whose Sinkhorn runs once per step
            instead of once per token.
        sinkhorn_iters: Sinkhorn-Knopp iterations for mHC, each normalising the columns then the rows
            (:mod:`hc_retrofit.sinkhorn_knopp` runs them in the exp or the log domain, whichever is
            cheaper for the batch; the same matrices up to rounding).
        width_init_main: initial weight of the stream each site reads most, ``a_(site mod n)``; the
            other streams share ``1 - width_init_main`` equally, so ``sum a = 1`` (exact). ``None``
            picks the default: 1.0 (one-hot, as in the HC paper) for static/dynamic, 0.9 for mHC
            (a sigmoid cannot reach one-hot).
        residual_init_main: diagonal of the initial stream-mixing matrix ``R`` for mHC (the rest of
            each row is shared equally, which is already doubly stochastic). Every site contracts
            the spread between streams by ``diag - off-diagonal``, so a low value damps stream
            divergence; 1.0 would need infinite Sinkhorn logits whose gradients vanish. 0.9
            (logit 3.3) keeps both alive. Static and dynamic HC start from ``R = I``.
        dynamic_scale_init: initial value of the scales ``s`` (dynamic) and ``alpha`` (mHC).
        ablate: turn every site back into a plain residual (``h + f(h)`` over one stream). For
            ablations: same code path, no hyper-connections.
    """

    num_streams: int = 4
    variant: str = "mhc"
    mhc_dynamic: bool = True
    sinkhorn_iters: int = 20
    width_init_main: float | None = None
    residual_init_main: float = 0.9
    dynamic_scale_init: float = 0.01
    ablate: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.num_streams, bool) or not isinstance(self.num_streams, int):
            raise ConfigError(f"num_streams must be an integer, got {self.num_streams!r}")
        if self.num_streams < 2:
            raise ConfigError(
                f"num_streams must be >= 2 (hyper-connections need several streams), got {self.num_streams}"
            )
        if self.num_streams > MAX_STREAMS:
            raise ConfigError(
                f"num_streams must be <= {MAX_STREAMS}, got {self.num_streams}: activations grow n-fold "
                "(the papers use 4)"
            )
        if self.variant not in VARIANTS:
            raise ConfigError(f"unknown variant {self.variant!r}: choose one of {', '.join(VARIANTS)}")
        if isinstance(self.sinkhorn_iters, bool) or not isinstance(self.sinkhorn_iters, int):
            raise ConfigError(f"sinkhorn_iters must be an integer, got {self.sinkhorn_iters!r}")
        if not (1 <= self.sinkhorn_iters <= MAX_SINKHORN_ITERS):
            raise ConfigError(
                f"sinkhorn_iters must be in [1, {MAX_SINKHORN_ITERS}], got {self.sinkhorn_iters} (default 20)"
            )
        main = self.width_init_main
        if main is not None:
            upper = 1.0 if self.variant != "mhc" else 1.0 - 1e-6
            if not (1.0 / self.num_streams <= main <= upper):
                raise ConfigError(
                    f"width_init_main must be in [1/num_streams, {'1' if upper == 1.0 else '1)'}] "
                    f"for variant {self.variant!r}, got {main}"
                )
            if main == 1.0 / self.num_streams:
                raise ConfigError(
                    "width_init_main = 1/num_streams gives uniform width weights, which lock all streams "
                    "into identical gradients (symmetry lock); pick a larger value"
                )
        if not (1.0 / self.num_streams < self.residual_init_main < 1.0):
            raise ConfigError(
                f"residual_init_main must be in (1/num_streams, 1), got {self.residual_init_main} "
                "(1.0 needs infinite Sinkhorn logits and freezes learning)"
            )
        if not math.isfinite(self.dynamic_scale_init):
            raise ConfigError("dynamic_scale_init must be finite")

    @property
    def width_main(self) -> float:
        """The effective ``width_init_main`` (default resolved per variant)."""
        if self.width_init_main is not None:
            return float(self.width_init_main)
        return 0.9 if self.variant == "mhc" else 1.0

    @property
    def is_dynamic(self) -> bool:
        """Whether coefficients depend on the input (per token) rather than only on parameters."""
        return self.variant == "dynamic" or (self.variant == "mhc" and self.mhc_dynamic)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of every field."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HCConfig:
        """Build from :meth:`to_dict` output; unknown keys raise :class:`ConfigError`."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown HCConfig key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(names))}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> HCConfig:
        return cls.from_dict(json.loads(text))
