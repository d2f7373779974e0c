"""The papers' equations, plainly: the reference every fast path is checked against.

Notation (per token; ``H`` holds ``n`` residual streams of width ``D``, shape ``(..., n, D)``)::

    x     = sum_k a_k H_k                      width connection   (branch input)
    y     = f(x)                               the branch (attention, MLP, ...), run once
    H'_j  = sum_k R_jk H_k + b_j y             depth connection

``R_jk`` is the weight of *input* stream ``k`` in *output* stream ``j`` (row = output). The HC
paper (2409.19606, Algorithm 2) writes the same matrix transposed, as ``A_r`` with
``H'^T = A_r^T H^T``; mHC (2512.24880) writes ``H_res`` exactly as ``R`` here.

Coefficients, per variant:

* static HC:  ``a``, ``R``, ``b`` are parameters.
* dynamic HC: each gets ``+ s * tanh(RMSNorm(H_k) W)`` (per stream ``k``: ``[a_k, R_.k, b_k]``).
* mHC:        ``a = sigmoid(.)``, ``b = 2 sigmoid(.)``, ``R = Sinkhorn(exp(.))``, each argument a
  bias plus (dynamic) ``s * (RMSNorm(vec H) phi)``.

Every function here is plain differentiable torch, with no state and no Python branching on
tensor values: autograd differentiates it, ``torch.compile`` traces and fuses it, and the fast
autograd Functions in :mod:`hc_retrofit.connections` are gradchecked against it. Coefficients are
float32 and cast to the streams' dtype where they multiply activations. The coefficient functions
take the projection and Sinkhorn as arguments so the fast path reuses the same equations with its
own kernels (one copy of each formula).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

EPS = 1e-6

Project = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Sinkhorn = Callable[[torch.Tensor, int], torch.Tensor]


def width(streams: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``x = sum_k a_k H_k``; ``a`` is ``(n,)`` (static) or ``(..., n)`` (per token)."""
    return torch.einsum("...k,...kd->...d", a.to(streams.dtype), streams)


def mix(streams: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``(R H)_j = sum_k R_jk H_k``; ``R`` is ``(n, n)`` or ``(..., n, n)``."""
    return torch.einsum("...jk,...kd->...jd", r.to(streams.dtype), streams)


def outer(b: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``b_j y`` for every stream ``j``: ``(..., n)`` and ``(..., D)`` -> ``(..., n, D)``."""
    return b.to(y.dtype).unsqueeze(-1) * y.unsqueeze(-2)


def depth(streams: torch.Tensor, r: torch.Tensor, b: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``H'_j = sum_k R_jk H_k + b_j y``."""
    return mix(streams, r) + outer(b, y.to(streams.dtype))


def rms_project(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``RMSNorm(x) @ w`` over the last dim (no norm weight), in (at least) float32."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)) @ w.to(xf.dtype)


def sinkhorn(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """Sinkhorn-Knopp projection of ``exp(logits)`` ``(..., n, n)`` onto doubly stochastic matrices.

    ``iters`` times: normalise the columns, then the rows (in the log domain). Ending on the rows
    makes the result exactly row-stochastic, the property exactness at init needs.
    """
    log_p = logits.to(torch.promote_types(logits.dtype, torch.float32))
    for _ in range(iters):
        log_p = torch.log_softmax(log_p, dim=-2)  # columns (sum over rows j)
        log_p = torch.log_softmax(log_p, dim=-1)  # rows (sum over columns k)
    return log_p.exp()


def hc_coefficients(
    a: torch.Tensor,
    r: torch.Tensor,
    b: torch.Tensor,
    proj: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    streams: torch.Tensor | None = None,
    project: Project = rms_project,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Static HC ``(a, R, b)``; with ``proj`` ``W`` ``(D, n + 2)`` and ``scale`` ``s`` ``(3,)``, dynamic HC.

    Dynamic: row ``k`` of ``tanh(RMSNorm(H_k) W)`` is ``[a_k, R_.k (column k), b_k]``, so each
    coefficient gets its input stream's term, scaled by its ``s``.
    """
    if proj is None:
        return a, r, b
    if streams is None:
        raise ValueError("dynamic HC coefficients need the streams")
    n = a.shape[-1]
    p = torch.tanh(project(streams, proj))  # (..., n_k, n + 2)
    s_a, s_r, s_b = scale
    return a + s_a * p[..., 0], r + s_r * p[..., 1 : n + 1].transpose(-1, -2), b + s_b * p[..., n + 1]


def mhc_coefficients(
    a_logits: torch.Tensor,
    r_logits: torch.Tensor,
    b_logits: torch.Tensor,
    iters: int,
    proj: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    streams: torch.Tensor | None = None,
    project: Project = rms_project,
    sinkhorn: Sinkhorn = sinkhorn,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mHC ``(sigmoid(.), Sinkhorn(.), 2 sigmoid(.))`` of the logits; with ``proj`` ``phi``
    ``(n D, 2n + n^2)`` and ``scale`` ``(3,)``, each logit gets ``s * (RMSNorm(vec H) phi)``."""
    if proj is not None:
        if streams is None:
            raise ValueError("dynamic mHC coefficients need the streams")
        n = a_logits.shape[-1]
        p = project(streams.flatten(-2), proj)  # (..., [a (n), b (n), R (n * n)])
        s_a, s_r, s_b = scale
        a_logits = a_logits + s_a * p[..., :n]
        b_logits = b_logits + s_b * p[..., n : 2 * n]
        r_logits = r_logits + s_r * p[..., 2 * n :].unflatten(-1, (n, n))
    return torch.sigmoid(a_logits), sinkhorn(r_logits, iters), 2 * torch.sigmoid(b_logits)


def ablated_coefficients(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A plain residual over ``n`` streams: ``a`` uniform, ``R = I``, ``b = 1``."""
    return torch.full((n,), 1.0 / n, device=device), torch.eye(n, device=device), torch.ones(n, device=device)
