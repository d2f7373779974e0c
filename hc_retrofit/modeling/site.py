"""One hyper-connection site: its parameters and initialisation, and the per-site API.

    x, ctx = site.width_connection(H)       # x = a . H, the branch input; ctx: what the depth side needs
    H' = site.depth_connection(ctx, f(x))   # H' = R H + b f(x)

plus the pieces a patched layer uses when it adds the residual itself: ``site.mix(ctx)`` (``R H``)
and ``site.outer(ctx, y)`` (``b (x) y``) for the site whose ``R H`` the layer receives as input,
``site.delta(ctx, y)`` (``(R - I) H + b (x) y``) for the others, and ``site.depth_around`` for a
whole layer as the branch. The coefficients are the equations of :mod:`hc_retrofit.formulas`,
run with the fast kernels (autograd), from a cache (no grad) or as they are (``torch.compile``).

Exactness at init: the initial coefficients (:mod:`.initial`) give ``sum_k a_k = 1``, every
``b_j = 1`` and a row-stochastic ``R``, so a converted model computes the original function.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .config import HCConfig
from .formulas import Project, ablated, hc_dynamic, hc_layout, mhc, mhc_dynamic_logits, mhc_layout
from .initial import initial_residual_logits, initial_width
from .kernels import DepthConnection, DepthWidth, Recomputed, WidthPass, cast, expanded_streams
from .no_grad import hc_rows, mhc_rows
from .projection import project_passing
from .sinkhorn_knopp import sinkhorn
from .site_cache import StaticParts, cache_key
from .stream_ops import depth_connection, outer_streams, rms_project, stream_mix, width_connection

__all__ = ["Coefficients", "HyperConnection", "SiteContext", "initial_residual_logits", "initial_width"]


@dataclass
class Coefficients:
    """``a`` ``(..., n)``, ``R`` ``(..., n, n)`` and ``b`` ``(..., n)``, float32.

    Static coefficients have no leading dims; dynamic ones have the token dims of ``H``.
    """

    a: torch.Tensor
    r: torch.Tensor
    b: torch.Tensor

    def to(self, dtype: torch.dtype) -> Coefficients:
        return Coefficients(cast(self.a, dtype), cast(self.r, dtype), cast(self.b, dtype))

    def minus_identity(self) -> Coefficients:
        """``a, R - I, b``: what a site applies when the layer adds ``H`` itself."""
        eye = torch.eye(self.r.shape[-1], device=self.r.device, dtype=self.r.dtype)
        return Coefficients(self.a, self.r - eye, self.b)


@dataclass
class SiteContext:
    """What :meth:`HyperConnection.width_connection` computed, for the depth side of the same call.

    ``r`` is ``R``, or ``R - I`` when ``adds_input`` (the layer adds ``H`` itself). ``source``:
    what ``streams`` are recomputed from in backward (see :meth:`HyperConnection.width_connection`), if any.
    ``mixed``: ``r`` times ``streams``, when it was computed together with ``x`` (without autograd);
    then per-token ``a`` and ``r`` are ``None`` (the depth side needs only ``mixed`` and ``b``, and at
    decode each view is an operator call per site and token).
    """

    streams: torch.Tensor
    x: torch.Tensor
    a: torch.Tensor | None
    r: torch.Tensor | None
    b: torch.Tensor
    adds_input: bool = False
    source: tuple | None = None
    mixed: torch.Tensor | None = None


def _float32(*params: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``params`` in float32 (themselves when they are): under FSDP2 with a low-precision
    ``MixedPrecisionPolicy`` the parameters arrive cast, and the coefficients stay float32."""
    return tuple(p.float() for p in params)


def _autocasting(streams: torch.Tensor) -> bool:
    """Whether autocast (mixed precision) is on for the device of ``streams``."""
    device = streams.device.type
    return torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)


class HyperConnection(nn.Module):
    """One hyper-connection site: the coefficients ``a, R, b`` of a branch, and how to apply them.

    Standalone use over any branch (the role of lucidrains' ``hyper-connections``)::

        hc = HyperConnection(dim=512, config=HCConfig(num_streams=4, variant="mhc"), site_index=i)
        H = expand_streams(h, 4)               # before the first block
        H = hc(H, lambda x: attn(norm(x)))     # per block: branch runs once, on x (batch B)
        h = reduce_streams(H)                  # after the last block

    Parameters are created in float32 and stay float32 when the module is cast (``model.to(bf16)``):
    the coefficients are tiny and precision-sensitive; they are cast to the stream dtype only where
    they multiply activations. Set ``ablate = True`` to make the site a plain residual
    (``a`` uniform, ``R = I``, ``b = 1``, which keeps identical streams identical).
    """

    def __init__(self, dim: int, config: HCConfig, site_index: int = 0) -> None:
        super().__init__()
        self.dim = dim
        self.config = config
        self.num_streams = n = config.num_streams
        self.variant = config.variant
        self.site_index = site_index
        self.ablate = config.ablate
        a0 = initial_width(n, config.width_main, site_index)
        f32 = {"dtype": torch.float32}
        if config.variant == "mhc":
            # a = sigmoid(logit a0) -> a0; b = 2 sigmoid(0) = 1; R = Sinkhorn(exp(logits)).
            self.width_logits = nn.Parameter(torch.logit(a0.double()).float())
            self.residual_logits = nn.Parameter(initial_residual_logits(n, config.residual_init_main))
            self.depth_logits = nn.Parameter(torch.zeros(n, **f32))
            if config.mhc_dynamic:
                # phi maps RMSNorm(vec H) (n*D) to the n + n*n + n logits; zero so init is exact.
                self.dynamic_proj = nn.Parameter(torch.zeros(n * dim, 2 * n + n * n, **f32))
                self.dynamic_scale = nn.Parameter(torch.full((3,), config.dynamic_scale_init, **f32))
        else:
            self.width = nn.Parameter(a0)
            self.residual = nn.Parameter(torch.eye(n, **f32))
            self.depth = nn.Parameter(torch.ones(n, **f32))
            if config.variant == "dynamic":
                # W maps norm(H_k) (D) to [a_k, R_{.k} (n), b_k]; zero so init is exact.
                self.dynamic_proj = nn.Parameter(torch.zeros(dim, n + 2, **f32))
                self.dynamic_scale = nn.Parameter(torch.full((3,), config.dynamic_scale_init, **f32))

    # -- parameters stay float32 -----------------------------------------------------------------
    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        super()._apply(fn, recurse)
        for p in self.parameters(recurse=False):
            if p.is_floating_point() and p.dtype != torch.float32:
                p.data = p.data.float()
        return self

    @property
    def is_dynamic(self) -> bool:
        return not self.ablate and "dynamic_proj" in self._parameters

    def static_coefficients(self) -> Coefficients:
        """``a, R, b`` without the input-dependent term of the dynamic variants (float32)."""
        n = self.num_streams
        if self.ablate:
            return Coefficients(*ablated(n, next(self.parameters()).device))
        if self.variant == "mhc":
            base, _ = mhc_layout(*_float32(self.width_logits, self.residual_logits, self.depth_logits))
            return Coefficients(*mhc(base, n, self.config.sinkhorn_iters, sinkhorn))
        return Coefficients(*_float32(self.width, self.residual, self.depth))

    def coefficients(self, streams: torch.Tensor | None = None) -> Coefficients:
        """``a, R, b`` for ``streams`` ``(..., n, D)`` (needed only by dynamic variants), float32."""
        if not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            return self._no_grad_coefficients(streams, torch.float32)
        return self._coefficients(streams)

    def _coefficients(self, streams: torch.Tensor | None, project: Project = rms_project) -> Coefficients:
        """:meth:`coefficients` with autograd (or under ``torch.compile``), the dynamic term
        projected by ``project``."""
        if not self.is_dynamic:
            return self.static_coefficients()
        if streams is None:
            raise ValueError(f"dynamic {'mHC' if self.variant == 'mhc' else 'HC'} coefficients need the streams")
        if _autocasting(streams):  # mixed precision: the coefficients stay float32
            with torch.autocast(streams.device.type, enabled=False):
                return self._coefficients(streams, project)
        if self.variant == "mhc":
            params = _float32(self.width_logits, self.residual_logits, self.depth_logits, self.dynamic_scale)
            logits = mhc_dynamic_logits(*mhc_layout(*params), self.dynamic_proj.float(), streams, project)
            return Coefficients(*mhc(logits, self.num_streams, self.config.sinkhorn_iters, sinkhorn))
        base, s = hc_layout(*_float32(self.width, self.residual, self.depth, self.dynamic_scale))
        return Coefficients(*hc_dynamic(base, s, self.dynamic_proj.float(), streams, project))

    def _eager_coefficients(self, streams: torch.Tensor, source: tuple | None) -> tuple[Coefficients, torch.Tensor]:
        """:meth:`coefficients` in eager autograd, and the streams the width connection reads: for
        dynamic variants the pass-through of :class:`~.projection.ProjectPass`, so the projection's
        gradient joins the streams' other gradient in one buffer (``source``: see ``made_of``)."""
        passed: list[torch.Tensor] = []

        def project(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            p, through = project_passing(x, w, source)
            passed.append(through)
            return p

        c = self._coefficients(streams, project)
        if not passed or expanded_streams(streams):  # static; layer 0's views (mHC's vec H copies them)
            return c, streams
        return c, passed[0].view(streams.shape)

    # -- coefficients without autograd (evaluation, generate()) ----------------------------------
    def _static_parts(self) -> StaticParts:
        """The input-independent part of the coefficients, rebuilt only when a parameter changes
        (see :mod:`hc_retrofit.site_cache`). No-grad only: it holds no graph."""
        params = [*self._parameters.values()]
        key = cache_key(params, self.ablate, self.config.sinkhorn_iters)
        cached: StaticParts | None = self.__dict__.get("_static_cache")
        if cached is not None and cached.key == key and key is not None:
            return cached
        with torch.no_grad():
            return self._build_static_parts(key, params)

    def _build_static_parts(self, key: tuple | None, params: list[nn.Parameter]) -> StaticParts:
        c = self.static_coefficients()
        parts = StaticParts(key, tuple((p, p.detach()) for p in params), c.a.detach(), c.r.detach(), c.b.detach())
        if self.is_dynamic:
            if self.variant == "mhc":
                layout = mhc_layout(self.width_logits, self.residual_logits, self.depth_logits, self.dynamic_scale)
            else:
                layout = hc_layout(self.width, self.residual, self.depth, self.dynamic_scale)
            parts.base, parts.scale = (t.detach() for t in layout)
            parts.proj = self.dynamic_proj.detach()
        self._static_cache = parts if key is not None else None
        return parts

    def clear_cache(self) -> None:
        """Drop the no-grad coefficient cache (needed only after writes through ``p.data``)."""
        self._static_cache = None

    def _no_grad_coefficients(
        self, streams: torch.Tensor | None, dtype: torch.dtype, minus_identity: bool = False
    ) -> Coefficients:
        """:meth:`coefficients` without autograd, in ``dtype`` (with ``R - I`` in place of ``R`` if
        ``minus_identity``): the same equations, the static part cached."""
        _, a, r, b = self._no_grad_rows(streams, dtype, minus_identity)
        return Coefficients(a, r, b)

    def _no_grad_rows(
        self, streams: torch.Tensor | None, dtype: torch.dtype, minus_identity: bool, views: bool = True
    ) -> tuple[torch.Tensor, ...]:
        """``[a; R]`` (``[a; R - I]`` if ``minus_identity``) as one ``(..., n + 1, n)`` matrix, its
        rows ``a`` and ``R`` (views; ``None`` for per-token coefficients unless ``views``: the no-grad
        depth side reads ``R H`` computed with ``x``), and ``b``, in ``dtype``, without autograd: one product with
        ``H`` then gives the branch input and the mix together. Static coefficients come from the
        cache; dynamic ones from the cached layout in a few calls (:mod:`hc_retrofit.modeling.no_grad`)."""
        parts = self._static_parts()
        if parts.proj is None:  # static coefficients (also a dynamic site when ablated)
            return parts.rows(dtype, minus_identity)
        if streams is None:
            raise ValueError(f"dynamic {'mHC' if self.variant == 'mhc' else 'HC'} coefficients need the streams")
        if _autocasting(streams):  # mixed precision: the coefficients stay float32
            with torch.autocast(streams.device.type, enabled=False):
                return self._no_grad_rows(streams, dtype, minus_identity, views)
        if self.variant == "mhc":
            rows, b = mhc_rows(parts, streams, self.config.sinkhorn_iters, dtype, minus_identity)
        else:
            rows, b = hc_rows(parts, streams, dtype, minus_identity)
        if not views:
            return rows, None, None, b
        return rows, rows.select(-2, 0), rows.narrow(-2, 1, self.num_streams), b

    def _width_no_grad(self, streams: torch.Tensor, adds_input: bool) -> tuple[torch.Tensor, SiteContext]:
        """:meth:`width_connection` without autograd (evaluation, ``generate()``): ``a . H`` and
        ``R H`` (or ``(R - I) H``) as one product ``[a; R] H``. At decode (one token: ``n x D``
        tensors) each op and each Python call costs more than its arithmetic, so this path is kept
        to one product and a few views: one token's streams are handled as an ``(n, D)`` matrix
        (its coefficients then have no token dims)."""
        shape = streams.shape
        n, d = shape[-2], shape[-1]
        one_token = streams.numel() == n * d
        h = streams.reshape(n, d) if one_token else streams
        rows, a, r, b = self._no_grad_rows(h, streams.dtype, adds_input, views=False)
        if expanded_streams(streams):  # layer 0's n views of one h: every product a scaling of h
            out = rows.sum(-1, keepdim=True) * streams.narrow(-2, 0, 1)
            x = out.select(-2, 0).contiguous()
        elif one_token:  # (decode): a plain 2-D product; its row 0 is x, already contiguous
            out = torch.mm(rows, h).view(*shape[:-2], n + 1, d)
            x = out.select(-2, 0)
        else:
            out = torch.matmul(rows, streams)
            x = out.select(-2, 0).contiguous()  # (the branch gets a plain tensor)
        return x, SiteContext(streams, x, a, r, b, adds_input, mixed=out.narrow(-2, 1, n))

    # -- the per-site API ------------------------------------------------------------------------
    def width_connection(
        self,
        streams: torch.Tensor,
        adds_input: bool = False,
        made_of: tuple[SiteContext, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, SiteContext]:
        """``x = a . H``, the branch input, and the context :meth:`depth_connection` (or :meth:`delta`) needs.

        ``adds_input``: the caller adds ``H`` itself after :meth:`delta` (a layer's own residual).
        ``made_of = (ctx0, y0)``: ``streams`` are exactly ``depth_connection(ctx0, y0)`` of another
        site. With autograd (eager) they are then not saved for backward but recomputed there,
        once, from tensors saved anyway (``n x D`` per token less memory).
        """
        if not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            return self._width_no_grad(streams, adds_input)
        if torch.compiler.is_compiling():  # the formulas, which the compiler fuses
            c = self._coefficients(streams)
            if adds_input:
                c = c.minus_identity()
            x = width_connection(streams, c.a)
            return x, SiteContext(streams, x, c.a, c.r, c.b, adds_input)
        source = None
        if made_of is not None:
            ctx0, y0 = made_of
            source = (Recomputed(), (ctx0.streams, ctx0.r, ctx0.b, y0))
        c, read = self._eager_coefficients(streams, source)
        if adds_input:
            c = c.minus_identity()
        # The depth side reads the streams through WidthPass: one consumer, one gradient.
        x, passed = WidthPass.apply(read, c.a, source)
        return x, SiteContext(passed, x, c.a, c.r, c.b, adds_input, source)

    def depth_connection(self, ctx: SiteContext, y: torch.Tensor) -> torch.Tensor:
        """``H' = R H + b (x) y``."""
        if ctx.mixed is not None:
            return torch.addcmul(ctx.mixed, cast(ctx.b, y.dtype).unsqueeze(-1), y.unsqueeze(-2))
        if ctx.source is not None and not ctx.adds_input:  # H recomputed in backward
            return DepthConnection.apply(ctx.streams, ctx.r, ctx.b, y, ctx.source)
        return depth_connection(ctx.streams, ctx.r, ctx.b, y)

    def advance(
        self, ctx: SiteContext, y: torch.Tensor, following: HyperConnection | None = None, recompute: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None, SiteContext | None]:
        """``H' = R H + b (x) y`` and, if a ``following`` site reads ``H'``, its width connection.

        Returns ``(H', x', ctx')`` (``x', ctx'`` are ``None`` without a following site). With
        ``recompute`` (eager, autograd) the following site recomputes ``H'`` in backward from
        what this site saves anyway instead of saving it (see :meth:`width_connection`).
        """
        if ctx.mixed is not None:  # no autograd: R H was computed with x, one addcmul adds b (x) y
            new = torch.addcmul(ctx.mixed, ctx.b.unsqueeze(-1), y.unsqueeze(-2))
            if following is None:
                return new, None, None
            x, next_ctx = following._width_no_grad(new, False)
            return new, x, next_ctx
        if (
            following is not None
            and not following.is_dynamic
            and not ctx.adds_input
            and torch.is_grad_enabled()
            and not torch.compiler.is_compiling()
        ):  # eager autograd, a' independent of H': one Function, one gradient of H'
            c = following.static_coefficients()
            new, x = DepthWidth.apply(ctx.streams, ctx.r, ctx.b, y, c.a, ctx.source)
            source = (Recomputed(), (ctx.streams, ctx.r, ctx.b, y)) if recompute else None
            return new, x, SiteContext(new, x, c.a, c.r, c.b, False, source)
        new = self.depth_connection(ctx, y)
        if following is None:
            return new, None, None
        x, next_ctx = following.width_connection(new, made_of=(ctx, y) if recompute else None)
        return new, x, next_ctx

    def mix(self, ctx: SiteContext) -> torch.Tensor:
        """``R H`` (what a layer that adds ``b (x) y`` to its input receives as input)."""
        if ctx.mixed is not None:
            return ctx.mixed.contiguous()
        return stream_mix(ctx.streams, ctx.r)

    def outer(self, ctx: SiteContext, y: torch.Tensor) -> torch.Tensor:
        """``b (x) y``."""
        return outer_streams(ctx.b, y)

    def delta(self, ctx: SiteContext, y: torch.Tensor, divisor: float = 1.0) -> torch.Tensor:
        """``(R - I) H / divisor + b (x) y``: what a layer computing ``H + divisor * delta`` must add
        to reach ``R H + divisor b (x) y`` (``ctx`` from ``width_connection(H, adds_input=True)``)."""
        if ctx.mixed is not None:  # computed with x (no autograd); not modified: an exit may call this twice
            delta = ctx.mixed if divisor == 1.0 else ctx.mixed / divisor
            return torch.addcmul(delta, cast(ctx.b, y.dtype).unsqueeze(-1), y.unsqueeze(-2))
        if ctx.source is not None:  # H recomputed in backward
            delta = DepthConnection.apply(ctx.streams, ctx.r, None, None, ctx.source)
        else:
            delta = stream_mix(ctx.streams, ctx.r)
        if divisor != 1.0:
            delta = delta / divisor
        return delta.addcmul_(cast(ctx.b, y.dtype).unsqueeze(-1), y.unsqueeze(-2))

    def depth_around(self, ctx: SiteContext, out: torch.Tensor) -> torch.Tensor:
        """``H'`` for a whole layer as the branch, ``F(x) = out - x``: ``(R H - b x) + b out``.

        ``R H - b x`` first: with equal streams it is exactly 0 at init, so ``H' = out`` exactly.
        """
        if ctx.mixed is not None:  # (no autograd: R H computed with x)
            b = cast(ctx.b, ctx.mixed.dtype).unsqueeze(-1)
            return torch.addcmul(ctx.mixed, -b, ctx.x.unsqueeze(-2)).addcmul_(b, out.unsqueeze(-2))
        return depth_connection(ctx.streams, ctx.r, -ctx.b, ctx.x) + outer_streams(ctx.b, out)

    def forward(self, streams: torch.Tensor, branch: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``H -> R H + b f(a . H)``: one residual block over ``n`` streams ``(..., n, D)``."""
        x, ctx = self.width_connection(streams)
        return self.depth_connection(ctx, branch(x))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, streams={self.num_streams}, variant={self.variant!r}, site={self.site_index}" + (
            ", ablated" if self.ablate else ""
        )
