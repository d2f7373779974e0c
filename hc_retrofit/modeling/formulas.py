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
autograd Functions (:mod:`hc_retrofit.kernels`, :mod:`hc_retrofit.sinkhorn_knopp`) are gradchecked
against it. Coefficients are float32 and cast to the streams' dtype where they multiply
activations. The coefficient functions take the projection and Sinkhorn as arguments, so every
path (autograd, no-grad, compiled, inspection) uses these equations with its own kernels: one
copy of each formula.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

EPS = 1e-6

Project = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Sinkhorn = Callable[[torch.Tensor, int], torch.Tensor]


def width(streams: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``x = sum_k a_k H_k``; ``a`` is ``(n,)`` (static) or ``(..., n)`` (per token).

    Written as a product and a sum over the ``n`` streams (not a batched matrix product), here and
    in :func:`mix`: ``torch.compile`` then fuses it into the loops around it instead of calling a
    ``bmm`` of ``n x n`` by ``n x D`` per site (one more kernel and one more pass over the streams).
    """
    return (a.to(streams.dtype).unsqueeze(-1) * streams).sum(-2)


def mix(streams: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``(R H)_j = sum_k R_jk H_k``; ``R`` is ``(n, n)`` or ``(..., n, n)``."""
    return (r.to(streams.dtype).unsqueeze(-1) * streams.unsqueeze(-3)).sum(-2)


def outer(b: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``b_j y`` for every stream ``j``: ``(..., n)`` and ``(..., D)`` -> ``(..., n, D)``."""
    return b.to(y.dtype).unsqueeze(-1) * y.unsqueeze(-2)


def depth(streams: torch.Tensor, r: torch.Tensor, b: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``H'_j = sum_k R_jk H_k + b_j y``."""
    return mix(streams, r) + outer(b, y.to(streams.dtype))


def rms_project(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``RMSNorm(x) @ w`` over the last dim (no norm weight), in (at least) float32.

    The norm is a factor per row, applied to the few outputs: ``(x @ w) / rms(x)``, so the product
    reads ``x`` itself and no normalised copy of it is written.
    """
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    return (xf @ w.to(xf.dtype)) * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)


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


# ----------------------------------------------------------------------------- coefficients
# The dynamic term of every coefficient is one projection of the streams, so each variant is
# written as ``base + s * project(H) W`` in the projection's layout (one ``addcmul``), ``base``
# and ``s`` gathered from the parameters by the ``*_layout`` functions. The same functions serve
# autograd (the layout rebuilt per call), the no-grad path (the layout cached) and inspection.


def hc_layout(
    a: torch.Tensor, r: torch.Tensor, b: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic HC's ``(base, s)``: row ``k`` is ``[a_k, R_.k (column k: input stream k), b_k]``."""
    n = a.shape[-1]
    s_a, s_r, s_b = scale.unsqueeze(-1)
    base = torch.cat([a.unsqueeze(-1), r.transpose(-1, -2), b.unsqueeze(-1)], dim=-1)  # (n, n + 2)
    return base, torch.cat([s_a, s_r.expand(n), s_b])


def hc_dynamic_table(
    base: torch.Tensor, s: torch.Tensor, w: torch.Tensor, streams: torch.Tensor, project: Project = rms_project
) -> torch.Tensor:
    """Dynamic HC (DHC): ``[a_k, R_.k, b_k] = base_k + s * tanh(RMSNorm(H_k) W)`` for each stream ``k``,
    as one ``(..., n, n + 2)`` table (row ``k``; :func:`hc_dynamic` splits it)."""
    return torch.addcmul(base, s, torch.tanh(project(streams, w)))


def hc_dynamic(
    base: torch.Tensor, s: torch.Tensor, w: torch.Tensor, streams: torch.Tensor, project: Project = rms_project
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dynamic HC's ``a, R, b`` (see :func:`hc_dynamic_table`)."""
    n = base.shape[-2]
    coef = hc_dynamic_table(base, s, w, streams, project)  # (..., n_k, n + 2)
    return coef[..., 0], coef[..., 1 : n + 1].transpose(-1, -2), coef[..., n + 1]


def mhc_layout(
    a_logits: torch.Tensor, r_logits: torch.Tensor, b_logits: torch.Tensor, scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """mHC's logits ``[a (n), b (n), R (n * n)]`` and (dynamic) their scales ``s`` in the same layout."""
    n = a_logits.shape[-1]
    base = torch.cat([a_logits, b_logits, r_logits.flatten()])
    if scale is None:
        return base, None
    s_a, s_r, s_b = scale.unsqueeze(-1)
    return base, torch.cat([s_a.expand(n), s_b.expand(n), s_r.expand(n * n)])


def mhc_dynamic_logits(
    base: torch.Tensor, s: torch.Tensor, phi: torch.Tensor, streams: torch.Tensor, project: Project = rms_project
) -> torch.Tensor:
    """mHC's per-token logits ``base + s * (RMSNorm(vec H) phi)``, ``vec H`` the ``n D`` streams of a token."""
    return torch.addcmul(base, s, project(streams.flatten(-2), phi))


def mhc(logits: torch.Tensor, n: int, iters: int, sinkhorn: Sinkhorn = sinkhorn) -> tuple[torch.Tensor, ...]:
    """mHC's ``a = sigmoid(.)``, ``R = Sinkhorn(exp(.))``, ``b = 2 sigmoid(.)`` of ``[a, b, R]`` logits."""
    a_b = torch.sigmoid(logits[..., : 2 * n])
    return a_b[..., :n], sinkhorn(logits[..., 2 * n :].unflatten(-1, (n, n)), iters), 2 * a_b[..., n:]


def ablated(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A plain residual over ``n`` streams: ``a`` uniform, ``R = I``, ``b = 1``."""
    return torch.full((n,), 1.0 / n, device=device), torch.eye(n, device=device), torch.ones(n, device=device)
