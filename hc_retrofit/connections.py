"""The hyper-connection maths: static HC, dynamic HC and mHC. Knows nothing of transformers.

Notation (per token; ``H`` holds ``n`` residual streams of width ``D``, shape ``(..., n, D)``)::

    x     = sum_k a_k H_k                      width connection   (branch input)
    y     = f(x)                               the branch (attention, MLP, ...), run once
    H'_j  = sum_k R_jk H_k + b_j y             depth connection

``R_jk`` is the weight of *input* stream ``k`` in *output* stream ``j`` (row = output). The HC
paper (2409.19606, Algorithm 2) writes the same matrix transposed, as ``A_r`` with
``H'^T = A_r^T H^T``; mHC (2512.24880) writes ``H_res`` exactly as ``R`` here.

Variants (:class:`HyperConnection`):

* ``static``  -- ``a``, ``R``, ``b`` are parameters.
* ``dynamic`` -- adds ``s * tanh(norm(H) W)`` to each of them (DHC), ``W = 0`` at init.
* ``mhc``     -- ``a = sigmoid(.)``, ``b = 2 sigmoid(.)``, ``R = Sinkhorn(exp(.))`` (doubly
  stochastic), each argument a bias plus (optionally) ``alpha * (RMSNorm(vec H) phi)``, ``phi = 0``.

Exactness at init: with ``expand`` = copy into n streams and ``reduce`` = mean, a converted model
computes the original function iff ``sum_k a_k = 1``, every ``b_j = 1`` and every row of ``R``
sums to 1. All inits below satisfy this, and none is uniform in ``a`` (that would lock all streams
into identical gradients: the *symmetry lock*). Our Sinkhorn ends on a row normalisation, so ``R``
stays exactly row-stochastic (the property exactness needs) whatever the number of iterations.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from hc_retrofit.config import HCConfig
from hc_retrofit.formulas import ablated_coefficients, hc_coefficients, mhc_coefficients
from hc_retrofit.formulas import depth as plain_depth
from hc_retrofit.formulas import mix as plain_mix
from hc_retrofit.formulas import outer as plain_outer
from hc_retrofit.formulas import rms_project as plain_rms_project
from hc_retrofit.formulas import sinkhorn as plain_sinkhorn
from hc_retrofit.formulas import width as plain_width

__all__ = [
    "Coefficients",
    "HyperConnection",
    "depth_connection",
    "expand_streams",
    "reduce_streams",
    "sinkhorn",
    "stream_mix",
    "width_connection",
]

_EPS = 1e-6


# ----------------------------------------------------------------------------- stream plumbing
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
    return _WidthConnection.apply(streams, a)


def stream_mix(streams: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``(R H)_j = sum_k R_jk H_k``; ``R`` is ``(n, n)`` or ``(..., n, n)``."""
    if torch.compiler.is_compiling():
        return plain_mix(streams, r)
    if not torch.is_grad_enabled():
        return _mix_no_grad(streams, r)
    return _DepthConnection.apply(streams, r, None, None)


def depth_connection(streams: torch.Tensor, r: torch.Tensor, b: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``H'_j = sum_k R_jk H_k + b_j y``; ``b`` is ``(n,)`` or ``(..., n)``, ``y`` is ``(..., D)``."""
    if torch.compiler.is_compiling():
        return plain_depth(streams, r, b, y)
    if not torch.is_grad_enabled():
        b, y = _cast(b, streams.dtype), _cast(y, streams.dtype)
        return _mix_no_grad(streams, r).addcmul_(b.unsqueeze(-1), y.unsqueeze(-2))
    return _DepthConnection.apply(streams, r, b, y)


# ----------------------------------------------------------------------------- no-grad path
# Without autograd (``torch.no_grad`` / ``inference_mode``: evaluation, ``generate()``) the
# Functions below buy nothing, and at decode (batch 1, one token: tensors of n x D) their per-call
# overhead is most of the HC cost. There the formulas above run as one or two plain torch ops.
def _cast(c: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return c if c.dtype == dtype else c.to(dtype)


def _expanded_streams(streams: torch.Tensor) -> bool:
    """Whether the ``n`` streams of ``(..., n, D)`` are views of one tensor (layer 0's input)."""
    return streams.shape[-2] > 1 and streams.stride(-2) == 0


def _width_no_grad(streams: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    a = _cast(a, streams.dtype)
    if _expanded_streams(streams):
        return streams[..., 0, :] * a.sum(-1, keepdim=True)
    if a.dim() == 1:
        return torch.matmul(a, streams)
    return torch.matmul(a.unsqueeze(-2), streams).squeeze(-2)


def _mix_no_grad(streams: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    r = _cast(r, streams.dtype)
    if _expanded_streams(streams):
        return r.sum(-1, keepdim=True) * streams[..., :1, :]
    return torch.matmul(r, streams)


# ----------------------------------------------------------------------------- fast kernels
# The stream operations are contractions over n (2-8) of large (tokens, n, D) tensors, so they are
# memory bound. Autograd through einsum handles them poorly (e.g. the gradient of a static R goes
# through a generic contraction over all tokens, ~10x the cost of a copy), so each is an
# autograd.Function whose forward and backward are batched matmuls over the M tokens: one
# (n x n) @ (n x D) product per token, static coefficients broadcast as a stride-0 batch (no copy).
# They save only what is saved anyway (H, y and the small coefficients) and recompute the rest.
# The plain formulas they implement are the docstrings above; tests/test_connections_fast.py
# gradchecks them against einsum in float64. Layer 0 receives ``expand_streams(h)`` (n views of
# one tensor, stride 0 over streams): there every product collapses to a scaling of ``h``.


def _tokens(t: torch.Tensor) -> torch.Tensor:
    """``(..., n, D) -> (M, n, D)``, a view (also of a stride-0 expanded tensor)."""
    return t.reshape(-1, t.shape[-2], t.shape[-1])


def _per_token(c: torch.Tensor, lead: torch.Size, base: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Coefficient ``c`` (``base`` or ``(..., *base)``) as an ``(M, *base)`` batch in ``dtype``."""
    return c.to(dtype).expand(*lead, *base).reshape(-1, *base)


def _grad_to(g: torch.Tensor, like: torch.Tensor, lead: torch.Size) -> torch.Tensor:
    """Per-token gradient ``(M, ...)`` summed back to the (possibly broadcast) shape of ``like``."""
    return g.reshape(*lead, *g.shape[1:]).sum_to_size(like.shape).to(like.dtype)


def _mix(streams: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``R H`` as a new ``(..., n, D)`` tensor (the forward of :func:`stream_mix`)."""
    lead, n, d = streams.shape[:-2], streams.shape[-2], streams.shape[-1]
    h = _tokens(streams)
    r_t = _per_token(r, lead, (n, n), streams.dtype)
    result = streams.new_empty(*lead, n, d)  # not a view: see _WidthConnection
    if _expanded_streams(h):
        torch.mul(r_t.sum(-1, keepdim=True), h[:, :1], out=result.view(-1, n, d))
    else:
        torch.bmm(r_t, h, out=result.view(-1, n, d))
    return result


def _outer(b: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``b (x) y`` as a new ``(..., n, D)`` tensor (the forward of :func:`outer_streams`)."""
    lead, d, n = y.shape[:-1], y.shape[-1], b.shape[-1]
    out = y.new_empty(*lead, n, d)
    torch.mul(_per_token(b, lead, (n,), y.dtype).unsqueeze(-1), y.reshape(-1, 1, d), out=out.view(-1, n, d))
    return out


def _mid_layer_streams(h0: torch.Tensor, r0: torch.Tensor, b0: torch.Tensor, y0: torch.Tensor) -> torch.Tensor:
    """``R0 H0 + b0 (x) y0``, bit for bit as the forward pass made it (same kernels, same inputs).

    A converted layer's mid-layer streams (the input of its second site) are exactly this sum of
    the outputs of :func:`stream_mix` and :func:`outer_streams` of its first site. Their inputs
    are saved for backward anyway, so the second site's Functions save those (``source``) and
    recompute the streams in backward instead of keeping another ``n x D`` per token.
    """
    return _mix(h0, r0).add_(_outer(b0, y0))


class _Recomputed:
    """One recomputation of a site's streams, shared by the Functions that need them in backward.

    A ``source`` is ``(_Recomputed(), (H0, R0, b0, y0))``; each Function saving it registers as a
    consumer, the first to ask in backward recomputes, the last one drops the result. It holds no
    tensor from the forward pass (those go through ``save_for_backward``, so checkpointing and
    saved-tensor hooks see them).
    """

    def __init__(self) -> None:
        self.consumers = self.uses = 0
        self.value: torch.Tensor | None = None

    def get(self, tensors: tuple) -> torch.Tensor:
        if self.value is None:
            self.value = _mid_layer_streams(*tensors)
        value, self.uses = self.value, self.uses + 1
        if self.uses >= self.consumers:  # (reset: a retained graph may run backward again)
            self.value, self.uses = None, 0
        return value


def _save(ctx, streams: torch.Tensor | None, source: tuple | None, *others: torch.Tensor | None) -> None:
    """Save ``streams`` (or the ``source`` they are recomputed from) and ``others``."""
    ctx.streams_shape = None if streams is None else streams.shape
    ctx.recomputed = None
    if source is None:
        ctx.save_for_backward(*others, streams)
        return
    ctx.recomputed, tensors = source
    ctx.recomputed.consumers += 1
    ctx.save_for_backward(*others, *tensors)


def _saved(ctx, count: int) -> tuple[list, torch.Tensor | None]:
    """``(others, streams)`` as :func:`_save` stored them (``streams`` recomputed if needed)."""
    saved = ctx.saved_tensors
    others, rest = list(saved[:count]), saved[count:]
    if ctx.recomputed is None:
        return others, rest[0]
    return others, ctx.recomputed.get(rest).reshape(ctx.streams_shape)


class _WidthConnection(torch.autograd.Function):
    """``x = a . H``: forward ``bmm(a, H)``; backward ``dH = a (x) dx``, ``da_k = H_k . dx``."""

    @staticmethod
    def forward(ctx, streams: torch.Tensor, a: torch.Tensor, source: tuple | None = None) -> torch.Tensor:
        lead, n, d = streams.shape[:-2], streams.shape[-2], streams.shape[-1]
        h = _tokens(streams)
        a_t = _per_token(a, lead, (n,), streams.dtype).unsqueeze(1)  # (M, 1, n)
        # Write into the final shape: an output that is a view would forbid in-place use later.
        x = streams.new_empty(*lead, d)
        if _expanded_streams(h):
            torch.mul(h[:, 0], a_t.sum(-1), out=x.view(-1, d))
        else:
            torch.bmm(a_t, h, out=x.view(-1, 1, d))
        ctx.shape, ctx.dtype = streams.shape, streams.dtype
        _save(ctx, streams if ctx.needs_input_grad[1] else None, source if ctx.needs_input_grad[1] else None, a)
        return x

    @staticmethod
    def backward(ctx, gx: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        lead, n = ctx.shape[:-2], ctx.shape[-2]
        g = gx.reshape(-1, 1, gx.shape[-1])  # (M, 1, D)
        (a,), streams = _saved(ctx, 1)
        a_t = _per_token(a, lead, (n,), ctx.dtype).unsqueeze(-1)  # (M, n, 1)
        d_streams = (a_t * g).reshape(ctx.shape) if ctx.needs_input_grad[0] else None
        d_a = None
        if ctx.needs_input_grad[1]:
            h = _tokens(streams)
            if _expanded_streams(h):
                dots = torch.bmm(g, h[:, :1].transpose(1, 2)).expand(-1, n, 1)
            else:
                dots = torch.bmm(h, g.transpose(1, 2))  # (M, n, 1): H_k . dx
            d_a = _grad_to(dots.squeeze(-1), a, lead)
        return d_streams, d_a, None


class _DepthConnection(torch.autograd.Function):
    """``H' = R H (+ b (x) y)``: forward ``bmm(R, H)`` then ``baddbmm_(b, y)``; backward
    ``dH = R^T dH'``, ``dR = dH' H^T``, ``db_j = dH'_j . y``, ``dy = b^T dH'`` (all per token).
    ``b`` and ``y`` may both be ``None`` (:func:`stream_mix`)."""

    @staticmethod
    def forward(ctx, streams, r, b, y, source=None):  # type: ignore[override]
        lead, n, d = streams.shape[:-2], streams.shape[-2], streams.shape[-1]
        result = _mix(streams, r)
        if y is not None:
            b_t = _per_token(b, lead, (n,), streams.dtype).unsqueeze(-1)  # (M, n, 1)
            y_t = y.to(streams.dtype).expand(*lead, d).reshape(-1, 1, d)
            result.view(-1, n, d).baddbmm_(b_t, y_t)
        ctx.shape, ctx.dtype = streams.shape, streams.dtype
        _save(ctx, streams if ctx.needs_input_grad[1] else None, source if ctx.needs_input_grad[1] else None, r, b, y)
        return result

    @staticmethod
    def backward(ctx, g_out):  # type: ignore[override]
        (r, b, y), streams = _saved(ctx, 3)
        lead, n, d = ctx.shape[:-2], ctx.shape[-2], ctx.shape[-1]
        g = _tokens(g_out.to(ctx.dtype))
        d_streams = d_r = d_b = d_y = None
        if ctx.needs_input_grad[0]:
            r_t = _per_token(r, lead, (n, n), ctx.dtype)
            d_streams = torch.bmm(r_t.transpose(1, 2), g).reshape(ctx.shape)
        if ctx.needs_input_grad[1]:
            h = _tokens(streams)
            if _expanded_streams(h):
                dots = torch.bmm(g, h[:, :1].transpose(1, 2)).expand(-1, n, n)
            else:
                dots = torch.bmm(g, h.transpose(1, 2))  # (M, n, n): dH'_j . H_k
            d_r = _grad_to(dots, r, lead)
        if y is not None:
            y_t = y.to(ctx.dtype).expand(*lead, d).reshape(-1, 1, d)
            if ctx.needs_input_grad[2]:
                d_b = _grad_to(torch.bmm(g, y_t.transpose(1, 2)).squeeze(-1), b, lead)
            if ctx.needs_input_grad[3]:
                b_t = _per_token(b, lead, (n,), ctx.dtype).unsqueeze(1)  # (M, 1, n)
                d_y = _grad_to(torch.bmm(b_t, g).squeeze(1), y, lead)
        return d_streams, d_r, d_b, d_y, None


class _Outer(torch.autograd.Function):
    """``b (x) y``: forward one broadcast multiply; backward ``db_j = dH_j . y``, ``dy = b^T dH`` as
    batched matmuls (autograd of the multiply would materialise ``dH * y`` at full stream size)."""

    @staticmethod
    def forward(ctx, b: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(b, y)
        return _outer(b, y)

    @staticmethod
    def backward(ctx, g_out: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        b, y = ctx.saved_tensors
        lead, d, n = y.shape[:-1], y.shape[-1], b.shape[-1]
        g = g_out.to(y.dtype).reshape(-1, n, d)
        d_b = d_y = None
        if ctx.needs_input_grad[0]:
            d_b = _grad_to(torch.bmm(g, y.reshape(-1, d, 1)).squeeze(-1), b, lead)
        if ctx.needs_input_grad[1]:
            b_t = _per_token(b, lead, (n,), y.dtype).unsqueeze(1)  # (M, 1, n)
            d_y = torch.bmm(b_t, g).reshape(y.shape)
        return d_b, d_y


def outer_streams(b: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``b_j y`` for every stream j: ``(n,)`` or ``(..., n)`` with ``(..., D)`` -> ``(..., n, D)``."""
    if torch.compiler.is_compiling():
        return plain_outer(b, y)
    if not torch.is_grad_enabled():
        return _cast(b, y.dtype).unsqueeze(-1) * y.unsqueeze(-2)
    return _Outer.apply(b, y)


class _RMSProject(torch.autograd.Function):
    """``RMSNorm(x) @ w`` (no norm weight) in float32, computed as ``(x @ w) * rsqrt(mean(x^2))``.

    The normalisation is a per-row scalar, so it is applied after the (narrow) projection and
    ``RMSNorm(x)`` is never materialised nor saved: backward recomputes from ``x`` (saved anyway
    by the connections) and the small ``x @ w`` and ``rsqrt`` it keeps.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, source: tuple | None = None) -> torch.Tensor:
        p, inv = _rms_project_parts(x, w)
        _save(ctx, x, source, w, p, inv)  # x, or what it is recomputed from (see _mid_layer_streams)
        return p * inv

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        (w, p, inv), x = _saved(ctx, 3)
        xf, w_c = x.to(p.dtype), w.to(p.dtype)
        g_p = g.to(p.dtype) * inv
        d_x = d_w = None
        if ctx.needs_input_grad[0]:
            # d inv / d x = -inv^3 x / F, and d out / d inv = p.
            coef = (g * p).sum(-1, keepdim=True) * inv.pow(3) * (-1.0 / x.shape[-1])
            d_x = torch.addcmul(g_p @ w_c.T, xf, coef).to(x.dtype)
        if ctx.needs_input_grad[1]:
            # (g^T x)^T rather than x^T g: the same product, several times faster on CPU BLAS.
            d_w = (g_p.reshape(-1, g_p.shape[-1]).T @ xf.reshape(-1, xf.shape[-1])).T.to(w.dtype)
        return d_x, d_w, None


def _project_recomputed(x: torch.Tensor, w: torch.Tensor, source: tuple) -> torch.Tensor:
    """:func:`rms_project` of streams that backward recomputes from ``source``."""
    return _RMSProject.apply(x, w, source)


def _rms_project_parts(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x @ w`` and ``rsqrt(mean(x^2) + eps)``, in (at least) float32."""
    ct = torch.promote_types(x.dtype, torch.float32)  # at least float32
    xf = _cast(x, ct)
    inv = torch.linalg.vector_norm(xf, dim=-1, keepdim=True).square_().div_(x.shape[-1]).add_(_EPS).rsqrt_()
    # x @ w for a narrow w (n + 2 or 2n + n^2 columns) as (w^T x^T)^T: several times faster on CPU BLAS.
    p = (_cast(w, ct).T @ xf.reshape(-1, x.shape[-1]).T).T
    return p.reshape(*x.shape[:-1], w.shape[-1]), inv


def rms_project(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``RMSNorm(x) @ w`` over the last dim of ``x``, in (at least) float32: the dynamic coefficients' input."""
    if torch.compiler.is_compiling():
        return plain_rms_project(x, w)
    if not torch.is_grad_enabled():
        p, inv = _rms_project_parts(x, w)
        return p.mul_(inv)
    return _RMSProject.apply(x, w)


def sinkhorn(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """Sinkhorn-Knopp projection of ``exp(logits)`` onto doubly stochastic matrices.

    Alternates column and row normalisation of ``(..., n, n)`` logits and finishes with the
    rows, so the result is exactly row-stochastic (what exactness needs) and doubly stochastic up
    to the convergence of ``iters`` iterations. The gradient is that of the iterations (not of the
    limit); see :class:`_Sinkhorn`.
    """
    if torch.compiler.is_compiling():
        return plain_sinkhorn(logits, iters)
    if not torch.is_grad_enabled() and logits.numel() <= _SMALL_BATCH * logits.shape[-1] * logits.shape[-2]:
        return _sinkhorn_log_domain(logits, iters)
    return _Sinkhorn.apply(logits, iters)


# Below this many matrices (decode: one per sequence) the cost is the number of kernel calls, and
# the log-domain iteration needs half as many (one fused ``log_softmax`` per normalisation, where
# the exp domain needs a sum and a division); above it the exp domain's cheaper arithmetic wins.
_SMALL_BATCH = 64


def _sinkhorn_log_domain(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """The same iterations as :func:`_sinkhorn_steps` in the log domain (no autograd needed)."""
    log_p = logits.to(torch.promote_types(logits.dtype, torch.float32))
    for _ in range(iters):
        log_p = torch.log_softmax(log_p, dim=-2)  # columns (sum over rows j)
        log_p = torch.log_softmax(log_p, dim=-1)  # rows (sum over columns k)
    return log_p.exp_()


def _sinkhorn_steps(logits: torch.Tensor, iters: int) -> list[torch.Tensor]:
    """The matrices of the Sinkhorn iterations, in the exp domain: ``[P_0, P_1, ..., P_2iters]``.

    ``logits`` are ``(n, n, ...)`` (tokens last: reductions over a leading dim of size n are
    vectorised over the contiguous tokens, ~8x faster than over a trailing dim of size n).
    ``P_0 = exp(logits - column max)`` (column normalisation comes first and ignores a per-column
    constant, so this is the log-domain iteration without overflow); then columns and rows are
    normalised in turn: two small kernels per step instead of ``logsumexp``'s six.
    """
    lp = logits.to(torch.promote_types(logits.dtype, torch.float32))  # at least float32
    # Clamp to exp(-80) > float32's smallest normal: a row of exact zeros would give 0 / 0 = NaN
    # where the log-domain iteration stays finite (entries this small get ~0 gradient either way).
    steps = [(lp - lp.amax(dim=0, keepdim=True)).clamp_min(-80.0).exp()]
    for _ in range(iters):
        for dim in (0, 1):  # columns (sum over rows j), then rows (sum over columns k)
            steps.append(steps[-1] / steps[-1].sum(dim, keepdim=True))
    return steps


def _tokens_last(t: torch.Tensor) -> torch.Tensor:
    """``(..., n, n) -> (n, n, ...)``, contiguous."""
    return t.permute(t.dim() - 2, t.dim() - 1, *range(t.dim() - 2)).contiguous()


def _tokens_first(t: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_tokens_last`, contiguous."""
    return t.permute(*range(2, t.dim()), 0, 1).contiguous()


class _Sinkhorn(torch.autograd.Function):
    """Sinkhorn-Knopp with a hand-written backward that saves only the logits.

    Autograd through ``2 iters`` log-domain normalisations records ~300 tiny kernels per site (and
    per token for dynamic mHC). Here backward recomputes the iterations and applies the gradient
    of ``Q = P / sum(P)``, ``dP = (dQ - sum(dQ * Q)) / sum(P)``, in reverse.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, iters: int) -> torch.Tensor:
        ctx.save_for_backward(logits)
        ctx.iters = iters
        return _tokens_first(_sinkhorn_steps(_tokens_last(logits), iters)[-1])

    @staticmethod
    def backward(ctx, g_out: torch.Tensor) -> tuple[torch.Tensor, None]:
        (logits,) = ctx.saved_tensors
        steps = _sinkhorn_steps(_tokens_last(logits), ctx.iters)
        g = _tokens_last(g_out.to(steps[-1].dtype))
        for i in range(len(steps) - 1, 0, -1):
            dim = 0 if i % 2 == 1 else 1
            q, total = steps[i], steps[i - 1].sum(dim, keepdim=True)
            g = (g - (g * q).sum(dim, keepdim=True)) / total
        return _tokens_first(g * steps[0]).to(logits.dtype), None


def _rms_norm(t: torch.Tensor) -> torch.Tensor:
    """Parameter-free RMS norm over the last dim, in float32."""
    t = t.float()
    return t * torch.rsqrt(t.pow(2).mean(dim=-1, keepdim=True) + _EPS)


@dataclass
class Coefficients:
    """``a`` ``(..., n)``, ``R`` ``(..., n, n)`` and ``b`` ``(..., n)``, float32.

    Static coefficients have no leading dims; dynamic ones have the token dims of ``H``.
    """

    a: torch.Tensor
    r: torch.Tensor
    b: torch.Tensor

    def to(self, dtype: torch.dtype) -> Coefficients:
        return Coefficients(_cast(self.a, dtype), _cast(self.r, dtype), _cast(self.b, dtype))

    def minus_identity(self) -> Coefficients:
        """``a, R - I, b``: what a site that adds its branch to the layer's own residual applies."""
        return Coefficients(
            self.a, self.r - torch.eye(self.r.shape[-1], device=self.r.device, dtype=self.r.dtype), self.b
        )


@dataclass
class _StaticParts:
    """What :meth:`HyperConnection.coefficients` computes without ``H``, cached for the no-grad path.

    ``coefficients``: ``a, R, b`` of a static site (for a dynamic site, its input-independent
    part); ``eye``: ``I``. Dynamic sites: the coefficients (or logits) are ``base + scale * proj``,
    one ``addcmul`` in the layout of the projection ``proj``. ``casts`` holds ``(a, R, b)`` and
    ``R - I`` per stream dtype.
    """

    key: tuple
    pinned: tuple  # the parameters and their storages of ``key``: ids and addresses stay unique
    coefficients: Coefficients
    eye: torch.Tensor
    base: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    proj: torch.Tensor | None = None  # the projection weight, detached (cheaper ops)
    casts: dict | None = None

    def cast(self, dtype: torch.dtype, minus_identity: bool) -> Coefficients:
        """``(a, R, b)`` or ``(a, R - I, b)`` in ``dtype``."""
        if self.casts is None:
            self.casts = {}
        key = (dtype, minus_identity)
        if key not in self.casts:
            c = self.coefficients.to(dtype)
            self.casts[key] = Coefficients(c.a, c.r - _cast(self.eye, dtype), c.b) if minus_identity else c
        return self.casts[key]


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

    # -- coefficients ----------------------------------------------------------------------------
    @property
    def is_dynamic(self) -> bool:
        return not self.ablate and hasattr(self, "dynamic_proj")

    def coefficients(self, streams: torch.Tensor | None = None) -> Coefficients:
        """``a, R, b`` for ``streams`` ``(..., n, D)`` (needed only by dynamic variants)."""
        if not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            return self._no_grad_coefficients(streams, torch.float32)
        return self._coefficients(streams)

    def _coefficients(self, streams: torch.Tensor | None, source: tuple | None = None) -> Coefficients:
        """:meth:`coefficients` with autograd: the equations of :mod:`hc_retrofit.formulas` with the
        fast projection and Sinkhorn; ``source``: what ``streams`` are recomputed from in backward
        (see ``_mid_layer_streams``), or ``None`` to save them."""
        if self.ablate:
            return Coefficients(*ablated_coefficients(self.num_streams, next(self.parameters()).device))
        dynamic = self.is_dynamic
        proj = self.dynamic_proj if dynamic else None
        scale = self.dynamic_scale if dynamic else None
        project = rms_project if source is None else functools.partial(_project_recomputed, source=source)
        if self.variant == "mhc":
            a_r_b = mhc_coefficients(
                self.width_logits,
                self.residual_logits,
                self.depth_logits,
                self.config.sinkhorn_iters,
                proj,
                scale,
                streams,
                project=project,
                sinkhorn=sinkhorn,
            )
        else:
            a_r_b = hc_coefficients(self.width, self.residual, self.depth, proj, scale, streams, project)
        return Coefficients(*a_r_b)

    # -- coefficients without autograd (evaluation, generate()) ----------------------------------
    def _static_parts(self) -> _StaticParts:
        """The input-independent part of the coefficients, recomputed only when a parameter changes.

        No-grad only (it holds no graph). The cache key is every parameter's version counter, which
        every in-place update bumps (optimizer steps, ``load_state_dict``, ``p.copy_()`` under
        ``no_grad``), and its storage (``.to()``, ``p.data = t``). Writes *through* ``p.data``
        (``p.data.add_()``) bypass the version counter: after those, call :meth:`clear_cache`.
        Parameters created under ``inference_mode`` have no version counter: nothing is cached.
        """
        params = self._parameters.values()
        key = None  # inference tensors do not track versions: nothing is cached
        if not any(p.is_inference() for p in params):
            key = (self.ablate, self.config.sinkhorn_iters, *((id(p), p._version, p.data_ptr()) for p in params))
        cached: _StaticParts | None = self.__dict__.get("_static_cache")
        if key is not None and cached is not None and cached.key == key:
            return cached
        pinned = tuple((p, p.detach()) for p in params)
        n, ref = self.num_streams, next(iter(params))
        eye = torch.eye(n, device=ref.device)
        base = scale = None
        if self.ablate:
            c = Coefficients(torch.full((n,), 1.0 / n, device=ref.device), eye, torch.ones(n, device=ref.device))
        elif self.variant == "mhc":
            c = Coefficients(
                torch.sigmoid(self.width_logits),
                sinkhorn(self.residual_logits, self.config.sinkhorn_iters),
                2 * torch.sigmoid(self.depth_logits),
            )
            if self.is_dynamic:  # logits [a (n), b (n), R (n*n)] = base + scale * proj
                s_a, s_r, s_b = self.dynamic_scale.unsqueeze(-1)
                base = torch.cat([self.width_logits, self.depth_logits, self.residual_logits.flatten()])
                scale = torch.cat([s_a.expand(n), s_b.expand(n), s_r.expand(n * n)])
        else:
            c = Coefficients(self.width.detach(), self.residual.detach(), self.depth.detach())
            if self.is_dynamic:  # row k, [a_k, R_.k (n), b_k] = base + scale * proj[k]
                s_a, s_r, s_b = self.dynamic_scale.unsqueeze(-1)
                base = torch.cat([self.width.unsqueeze(-1), self.residual.T, self.depth.unsqueeze(-1)], dim=-1)
                scale = torch.cat([s_a, s_r.expand(n), s_b])
        proj = self.dynamic_proj.detach() if self.is_dynamic else None
        parts = _StaticParts(key, pinned, c, eye, base, scale, proj)
        self._static_cache = parts if key is not None else None
        return parts

    def clear_cache(self) -> None:
        """Drop the no-grad coefficient cache (needed only after writes through ``p.data``)."""
        self._static_cache = None

    def _no_grad_coefficients(
        self, streams: torch.Tensor | None, dtype: torch.dtype, minus_identity: bool = False
    ) -> Coefficients:
        """:meth:`coefficients` without autograd, in ``dtype`` (with ``R - I`` in place of ``R`` if
        ``minus_identity``): the same values, the static part cached, the dynamic part in few ops.
        Under ``torch.compile`` the plain equations instead (the compiler fuses them; a cache keyed
        on parameter versions would only add guards)."""
        if torch.compiler.is_compiling():
            c = self._coefficients(streams).to(dtype)
            return c.minus_identity() if minus_identity else c
        parts = self._static_parts()
        if not self.is_dynamic:
            return parts.cast(dtype, minus_identity)
        if streams is None:
            raise ValueError(f"dynamic {'mHC' if self.variant == 'mhc' else 'HC'} coefficients need the streams")
        n = self.num_streams
        if self.variant == "mhc":
            logits = torch.addcmul(parts.base, parts.scale, rms_project(streams.flatten(-2), parts.proj))
            a_b = torch.sigmoid(logits[..., : 2 * n])
            r = sinkhorn(logits[..., 2 * n :].unflatten(-1, (n, n)), self.config.sinkhorn_iters)
            c = Coefficients(a_b[..., :n], r, 2 * a_b[..., n:]).to(dtype)
        else:
            coef = torch.addcmul(parts.base, parts.scale, torch.tanh(rms_project(streams, parts.proj)))
            c = Coefficients(coef[..., 0], coef[..., 1 : n + 1].transpose(-1, -2), coef[..., n + 1]).to(dtype)
        if minus_identity:
            c.r = c.r - _cast(parts.eye, dtype)
        return c

    # -- application -----------------------------------------------------------------------------
    def forward(self, streams: torch.Tensor, branch: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``H -> R H + b f(a . H)``: one residual block over ``n`` streams ``(..., n, D)``."""
        c = (
            self.coefficients(streams)
            if torch.is_grad_enabled() or torch.compiler.is_compiling()
            else self._no_grad_coefficients(streams, streams.dtype)
        )
        y = branch(width_connection(streams, c.a))
        return depth_connection(streams, c.r, c.b, y)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, streams={self.num_streams}, variant={self.variant!r}, site={self.site_index}" + (
            ", ablated" if self.ablate else ""
        )
