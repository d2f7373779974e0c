"""Sinkhorn-Knopp for mHC's residual matrix ``R``: the same iterations as
:func:`hc_retrofit.formulas.sinkhorn`, with a backward that does not record them.

With autograd, the iterations run in the exp domain inside one autograd Function whose backward
recomputes them from the logits (the only tensor it saves). Without autograd and for few
matrices (decode: one per sequence), and under ``torch.compile`` (which fuses it), the formula
itself runs: there the number of kernel calls is the cost, and the log domain needs half as many.
"""

from __future__ import annotations

import torch

from hc_retrofit.formulas import sinkhorn as plain_sinkhorn

__all__ = ["sinkhorn"]


def sinkhorn(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """Sinkhorn-Knopp projection of ``exp(logits)`` ``(..., n, n)`` onto doubly stochastic matrices.

    Alternates column and row normalisation and finishes with the rows, so the result is exactly
    row-stochastic (what exactness needs) and doubly stochastic up to the convergence of ``iters``
    iterations. The gradient is that of the iterations (not of the limit); see :class:`_Sinkhorn`.
    """
    if torch.compiler.is_compiling():
        return plain_sinkhorn(logits, iters)
    if not torch.is_grad_enabled() and logits.numel() <= _SMALL_BATCH * logits.shape[-1] * logits.shape[-2]:
        return plain_sinkhorn(logits, iters)
    return _Sinkhorn.apply(logits, iters)


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
