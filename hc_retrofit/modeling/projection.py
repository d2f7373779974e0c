"""The dynamic coefficients' projection ``RMSNorm(x) @ w`` as autograd Functions (eager, with autograd).

Dynamic HC projects every stream ``RMSNorm(H_k) W``, mHC every token's ``RMSNorm(vec H) phi``:
a narrow product (``n + 2`` or ``2n + n^2`` columns) of the whole streams. Its input gradient
``d x = (g * inv) W^T + c x`` is as large as the streams, so it is not formed on its own:
:class:`ProjectPass` passes the streams through (a view, as :class:`~.kernels.WidthPass` does)
for the site's width connection to read, and its backward adds the projection's gradient to the
gradient coming back through that view with one ``addmm`` and one ``addcmul_``, instead of a
separate ``(M, n, D)`` tensor that autograd then sums with the other (one more read and write).
"""

from __future__ import annotations

import torch

from .kernels import cast, save_streams, saved_streams

__all__ = ["ProjectPass", "project_passing", "rms_project_parts"]

EPS = 1e-6


def rms_project_parts(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x @ w`` and ``rsqrt(mean(x^2) + eps)``, in (at least) float32."""
    ct = torch.promote_types(x.dtype, torch.float32)  # at least float32
    xf = cast(x, ct)
    inv = torch.linalg.vector_norm(xf, dim=-1, keepdim=True).square_().div_(x.shape[-1]).add_(EPS).rsqrt_()
    # x @ w for a narrow w (n + 2 or 2n + n^2 columns), plainly: on an Intel Xeon with torch 2.13's MKL
    # up to 4x faster than (w^T x^T)^T (an AMD EPYC measured the opposite: docs/performance.md).
    p = xf.reshape(-1, x.shape[-1]) @ cast(w, ct)
    return p.reshape(*x.shape[:-1], w.shape[-1]), inv


class ProjectPass(torch.autograd.Function):
    """``RMSNorm(x) @ w`` in float32, computed as ``(x @ w) * rsqrt(mean(x^2))``, and ``x`` passed
    through (a view) for the width connection to read.

    The normalisation is a per-row scalar, so it is applied after the (narrow) projection and
    ``RMSNorm(x)`` is never materialised nor saved: backward recomputes from ``x`` (saved anyway
    by the connections, or recomputed from a ``source``: see :class:`~.kernels.Recomputed`) and
    the small ``x @ w`` and ``rsqrt`` it keeps. Backward writes ``dx = g_pass + (g * inv) W^T``
    (one ``addmm`` reading the pass-through's gradient) and adds ``c x`` in place.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, source: tuple | None = None):  # type: ignore[override]
        ctx.set_materialize_grads(False)
        p, inv = rms_project_parts(x, w)
        save_streams(ctx, x, source, w, p, inv)  # x, or what it is recomputed from
        return p * inv, x.view_as(x)

    @staticmethod
    def backward(ctx, g, g_pass):  # type: ignore[override]
        if g is None:
            return g_pass, None, None
        (w, p, inv), x = saved_streams(ctx, 3)
        xf, w_c = cast(x, p.dtype), cast(w, p.dtype)
        g_p = g.to(p.dtype) * inv
        d_x = d_w = None
        if ctx.needs_input_grad[0]:
            # d inv / d x = -inv^3 x / F, and d out / d inv = p.
            coef = (g * p).sum(-1, keepdim=True) * inv.pow(3) * (-1.0 / x.shape[-1])
            d_x = _input_grad(g_pass, g_p, w_c, xf, coef, x)
        if ctx.needs_input_grad[1]:
            # (g^T x)^T rather than x^T g: the same product, several times faster on CPU BLAS.
            d_w = (g_p.reshape(-1, g_p.shape[-1]).T @ xf.reshape(-1, xf.shape[-1])).T.to(w.dtype)
        return d_x, d_w, None


def _input_grad(
    g_pass: torch.Tensor | None, g_p: torch.Tensor, w: torch.Tensor, xf: torch.Tensor, coef: torch.Tensor, x
) -> torch.Tensor:
    """``g_pass + g_p W^T + coef x`` in ``x``'s dtype, written once (``g_pass`` may be ``None``)."""
    f = x.shape[-1]
    if g_pass is None:
        return torch.addcmul((g_p.reshape(-1, g_p.shape[-1]) @ w.T).view(x.shape), xf, coef).to(x.dtype)
    if x.dtype != g_p.dtype:  # low-precision streams: the projection's gradient in float32, then added
        d_p = torch.addcmul((g_p.reshape(-1, g_p.shape[-1]) @ w.T).view(x.shape), xf, coef)
        return g_pass + d_p.to(x.dtype)
    d_x = torch.addmm(g_pass.reshape(-1, f), g_p.reshape(-1, g_p.shape[-1]), w.T).view(x.shape)
    return d_x.addcmul_(xf, coef)


def project_passing(x: torch.Tensor, w: torch.Tensor, source: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(RMSNorm(x) @ w, x)``, the second a pass-through whose gradient the projection's joins
    (see :class:`ProjectPass`); ``source``: what ``x`` is recomputed from in backward, if anything."""
    return ProjectPass.apply(x, w, source)
