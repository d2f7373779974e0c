"""Sinkhorn-Knopp for mHC's residual matrix ``R``: the same iterations as
:func:`hc_retrofit.formulas.sinkhorn`, with a backward that does not record them.

With autograd, the iterations run in the exp domain inside one custom operator
(``torch.ops.hc_retrofit.sinkhorn_v1``) whose backward, another operator, recomputes them from
the logits (the only tensor it saves). ``torch.compile`` sees both as single opaque calls: it
neither unrolls nor differentiates the iterations (unrolled, they made an mHC model compile
several times slower than the original). For few matrices (decode: one per sequence) eager code
without autograd, and the operator, run the log-domain formula instead of the exp-domain
iterations: there the number of kernel calls is the cost, and the log domain needs half as many.

A compiled graph without autograd (a compiled decoding step, a compiled server's forward) runs the
exp-domain iterations as one nested compile region (``torch.compiler.nested_compile_region``)
instead, for any number of matrices: traced and compiled once per graph, its fused code called at
every site, without the operator's eager normalisations (one kernel call each) or the compile time
of unrolling them at every site (~6x the original's for a decoding step).
``HC_RETROFIT_SINKHORN=eager`` (read at import) keeps the operator there too, for a compiler that
does not handle regions; a torch without them keeps it as well.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import torch

from .formulas import sinkhorn as plain_sinkhorn

__all__ = ["SWITCH", "sinkhorn", "sinkhorn_backward_op", "sinkhorn_op"]


def sinkhorn(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """Sinkhorn-Knopp projection of ``exp(logits)`` ``(..., n, n)`` onto doubly stochastic matrices.

    Alternates column and row normalisation and finishes with the rows, so the result is exactly
    row-stochastic (what exactness needs) and doubly stochastic up to the convergence of ``iters``
    iterations. The gradient is that of the iterations (not of the limit), see :func:`_backward`.
    """
    if torch.is_grad_enabled():
        return sinkhorn_op(logits, iters)
    if torch.compiler.is_compiling():  # for any number of matrices (no guard on a dynamic batch)
        return (sinkhorn_op if _compiled_region is None else _compiled_region)(logits, iters)
    return plain_sinkhorn(logits, iters) if _few(logits) else sinkhorn_op(logits, iters)


def _few(logits: torch.Tensor) -> bool:
    return logits.numel() <= _SMALL_BATCH * logits.shape[-1] * logits.shape[-2]


# Below this many matrices (decode: one per sequence) the cost is the number of kernel calls, and
# the log-domain iteration needs half as many (one fused ``log_softmax`` per normalisation, where
# the exp domain needs a sum and a division); above it the exp domain's cheaper arithmetic wins.
_SMALL_BATCH = 64


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


def _exp_domain(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """The last of :func:`_sinkhorn_steps`, ``logits`` ``(..., n, n)``: what a compiled graph runs
    for few matrices without autograd (the exp domain: one reduction per normalisation)."""
    return _tokens_first(_sinkhorn_steps(_tokens_last(logits), iters)[-1])


SWITCH = "HC_RETROFIT_SINKHORN"
"""Environment variable: ``auto`` (the default; compiled graphs without autograd run Sinkhorn as a
nested compile region) or ``eager`` (they call the opaque operator, which runs the eager formula)."""


def _switch() -> str:
    value = os.environ.get(SWITCH, "").strip().lower() or "auto"
    if value not in ("auto", "eager"):  # a speed setting: never fail a model for it
        warnings.warn(f"hc-retrofit: {SWITCH}={value!r} is neither auto nor eager; using auto", stacklevel=2)
        return "auto"
    return value


def _nested_region(fn: Callable, switch: str) -> Callable | None:
    """``fn`` as a nested compile region, or ``None`` (``switch`` eager, or a torch without regions)."""
    region = getattr(torch.compiler, "nested_compile_region", None)
    return None if switch == "eager" or region is None else region(fn)


_compiled_region = _nested_region(_exp_domain, _switch())


def _tokens_last(t: torch.Tensor) -> torch.Tensor:
    """``(..., n, n) -> (n, n, ...)``, contiguous."""
    return t.permute(t.dim() - 2, t.dim() - 1, *range(t.dim() - 2)).contiguous()


def _tokens_first(t: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_tokens_last`, contiguous."""
    return t.permute(*range(2, t.dim()), 0, 1).contiguous()


def _forward(logits: torch.Tensor, iters: int) -> torch.Tensor:
    if _few(logits):  # (e.g. a compiled step with autograd, or HC_RETROFIT_SINKHORN=eager)
        return plain_sinkhorn(logits, iters)
    return _exp_domain(logits, iters)


def _backward(logits: torch.Tensor, g_out: torch.Tensor, iters: int) -> torch.Tensor:
    """The gradient of the iterations at ``logits``: they are recomputed (only the logits are
    saved), then ``dP = (dQ - sum(dQ * Q)) / sum(P)``, the gradient of ``Q = P / sum(P)``, is
    applied in reverse. Autograd through ``2 iters`` normalisations would record ~300 tiny kernels
    per site (and per token for dynamic mHC)."""
    steps = _sinkhorn_steps(_tokens_last(logits), iters)
    g = _tokens_last(g_out.to(steps[-1].dtype))
    for i in range(len(steps) - 1, 0, -1):
        dim = 0 if i % 2 == 1 else 1
        q, total = steps[i], steps[i - 1].sum(dim, keepdim=True)
        g = (g - (g * q).sum(dim, keepdim=True)) / total
    return _tokens_first(g * steps[0]).to(logits.dtype)


# ----------------------------------------------------------------------------- the opaque op
# One operator (and one for its backward) that torch.compile treats as a black box: it neither
# unrolls the 2 x iters normalisations nor differentiates through them, which made an mHC model
# compile several times slower than the original. The package and the copy of this file shipped
# as a checkpoint's remote code both import this module, maybe in one process: the first import
# defines the operators, later ones reuse them (the name is versioned: a change of semantics
# gets a new name).
_NAMESPACE, _NAME = "hc_retrofit", "sinkhorn_v1"


def _define_ops():
    """The forward and backward operators ``hc_retrofit::sinkhorn_v1[_backward]``, defined once per process."""
    namespace = getattr(torch.ops, _NAMESPACE)
    if hasattr(namespace, _NAME):  # defined by another copy of this module
        return getattr(namespace, _NAME), getattr(namespace, _NAME + "_backward")

    @torch.library.custom_op(f"{_NAMESPACE}::{_NAME}_backward", mutates_args=())
    def backward_op(logits: torch.Tensor, grad: torch.Tensor, iters: int) -> torch.Tensor:
        return _backward(logits, grad, iters)

    @backward_op.register_fake
    def _(logits: torch.Tensor, grad: torch.Tensor, iters: int) -> torch.Tensor:
        return torch.empty_like(logits)

    @torch.library.custom_op(f"{_NAMESPACE}::{_NAME}", mutates_args=())
    def forward_op(logits: torch.Tensor, iters: int) -> torch.Tensor:
        return _forward(logits, iters)

    @forward_op.register_fake
    def _(logits: torch.Tensor, iters: int) -> torch.Tensor:
        return logits.new_empty(logits.shape, dtype=torch.promote_types(logits.dtype, torch.float32))

    def setup_context(ctx, inputs: tuple, output: torch.Tensor) -> None:
        logits, iters = inputs
        ctx.save_for_backward(logits)
        ctx.iters = iters

    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (logits,) = ctx.saved_tensors
        return torch.ops.hc_retrofit.sinkhorn_v1_backward(logits, grad, ctx.iters), None

    forward_op.register_autograd(backward, setup_context=setup_context)
    return getattr(namespace, _NAME), getattr(namespace, _NAME + "_backward")


sinkhorn_op, sinkhorn_backward_op = _define_ops()
