"""The fast autograd Functions behind the stream operations (eager, with autograd).

Each implements an equation of :mod:`hc_retrofit.formulas` and is gradchecked against it
(tests/test_kernels.py). The stream operations are contractions over ``n`` (2-8) of large
``(tokens, n, D)`` tensors, so they are memory bound. Autograd through einsum handles them poorly
(e.g. the gradient of a static ``R`` goes through a generic contraction over all tokens, ~10x the
cost of a copy), so each is an ``autograd.Function`` whose forward and backward are batched
matmuls over the ``M`` tokens: one ``(n x n) @ (n x D)`` product per token, static coefficients
broadcast as a stride-0 batch (no copy). They save only what is saved anyway (``H``, ``y`` and the
small coefficients) and recompute the rest. Layer 0 receives ``expand_streams(h)`` (n views of one
tensor, stride 0 over streams): there every product collapses to a scaling of ``h``.

A Function may also save, in place of its streams, a *source* (:class:`Recomputed`): the tensors
the streams were made of, recomputed once in backward for all the Functions that share it; a
Function that only takes dot products with the streams and is the source's sole consumer takes
them with the source's tensors instead (:func:`_dots`) and nothing is recomputed. Where backward
needs both ``R^T G`` and ``b^T G`` it forms them with one product (:func:`_streams_and_y_grads`),
so the incoming gradient ``G`` is read once for both.
"""

from __future__ import annotations

import torch

__all__ = [
    "DepthConnection",
    "DepthWidth",
    "Outer",
    "Recomputed",
    "WidthConnection",
    "WidthPass",
    "at_least_float32",
    "cast",
    "expanded_streams",
    "mid_layer_streams",
    "save_streams",
    "saved_streams",
]


def cast(c: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return c if c.dtype == dtype else c.to(dtype)


def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32, or as it is if float32 or float64 (``torch.promote_types`` with float32, without
    its operator call: this runs per site and token at decode)."""
    return t if t.dtype == torch.float32 or t.dtype == torch.float64 else t.to(torch.float32)


def expanded_streams(streams: torch.Tensor) -> bool:
    """Whether the ``n`` streams of ``(..., n, D)`` are views of one tensor (layer 0's input)."""
    return streams.shape[-2] > 1 and streams.stride(-2) == 0


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
    result = streams.new_empty(*lead, n, d)  # not a view: see WidthConnection
    if expanded_streams(h):
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


def _depth(streams: torch.Tensor, r: torch.Tensor, b: torch.Tensor | None, y: torch.Tensor | None) -> torch.Tensor:
    """``R H (+ b (x) y)`` as a new ``(..., n, D)`` tensor (the forward of :class:`DepthConnection`)."""
    lead, n, d = streams.shape[:-2], streams.shape[-2], streams.shape[-1]
    result = _mix(streams, r)
    if y is not None:
        b_t = _per_token(b, lead, (n,), streams.dtype).unsqueeze(-1)  # (M, n, 1)
        y_t = y.to(streams.dtype).expand(*lead, d).reshape(-1, 1, d)
        result.view(-1, n, d).baddbmm_(b_t, y_t)
    return result


def mid_layer_streams(h0: torch.Tensor, r0: torch.Tensor, b0: torch.Tensor, y0: torch.Tensor) -> torch.Tensor:
    """``R0 H0 + b0 (x) y0``, bit for bit as the forward pass made it (:class:`DepthConnection`'s
    kernels on the same inputs).

    A converted layer's mid-layer streams (the input of its second site) are exactly the depth
    connection of its first site. Its inputs are saved for backward anyway, so the second site's
    Functions save those (``source``) and recompute the streams in backward instead of keeping
    another ``n x D`` per token.
    """
    return _depth(h0, r0, b0, y0)


class Recomputed:
    """One recomputation of a site's streams, shared by the Functions that need them in backward.

    A ``source`` is ``(Recomputed(), (H0, R0, b0, y0))``; each Function saving it registers as a
    consumer, the first to ask in backward recomputes, the last one drops the result. It holds no
    tensor from the forward pass (those go through ``save_for_backward``, so checkpointing and
    saved-tensor hooks see them).
    """

    def __init__(self) -> None:
        self.consumers = self.uses = 0
        self.value: torch.Tensor | None = None

    def get(self, tensors: tuple) -> torch.Tensor:
        if self.value is None:
            self.value = mid_layer_streams(*tensors)
        value = self.value
        self.skip()
        return value

    def skip(self) -> None:
        """Count a use that did not need the streams (a consumer that read ``tensors`` directly)."""
        self.uses += 1
        if self.uses >= self.consumers:  # (reset: a retained graph may run backward again)
            self.value, self.uses = None, 0


def save_streams(ctx, streams: torch.Tensor | None, source: tuple | None, *others: torch.Tensor | None) -> None:
    """Save ``streams`` (or the ``source`` they are recomputed from) and ``others``."""
    ctx.streams_shape = None if streams is None else streams.shape
    ctx.recomputed = None
    if source is None:
        ctx.save_for_backward(*others, streams)
        return
    ctx.recomputed, tensors = source
    ctx.recomputed.consumers += 1
    ctx.save_for_backward(*others, *tensors)


def saved_streams(ctx, count: int, direct: bool = False) -> tuple[list, torch.Tensor | tuple | None]:
    """``(others, streams)`` as :func:`save_streams` stored them (``streams`` recomputed if needed).

    ``direct``: the caller only takes dot products with the streams (:func:`_dots`), which it can
    take with the source's ``H0`` and ``y0`` instead; if it is the source's only consumer, the
    streams are not recomputed and ``streams`` is the source's tensors ``(H0, R0, b0, y0)``.
    """
    saved = ctx.saved_tensors
    others, rest = list(saved[:count]), saved[count:]
    if ctx.recomputed is None:
        return others, rest[0]
    if direct and ctx.recomputed.consumers == 1:
        ctx.recomputed.skip()
        return others, tuple(rest)
    return others, ctx.recomputed.get(rest).reshape(ctx.streams_shape)


def _dots(g: torch.Tensor, streams: torch.Tensor | tuple, lead: torch.Size) -> torch.Tensor:
    """``g_i . H_k`` per token, ``(M, rows, n)`` for ``g`` ``(M, rows, D)``, in ``g``'s dtype.

    ``streams`` may be a source ``(H0, R0, b0, y0)`` of ``H = R0 H0 + b0 (x) y0``: then
    ``g H^T = (g H0^T) R0^T + (g y0) b0^T``, a read of ``H0`` and ``y0`` instead of recomputing ``H``.
    """
    if not isinstance(streams, tuple):
        h = _tokens(streams)
        if expanded_streams(h):
            return torch.bmm(g, h[:, :1].transpose(1, 2)).expand(-1, g.shape[1], h.shape[1])
        return torch.bmm(g, h.transpose(1, 2))
    h0, r0, b0, y0 = streams
    n, d = h0.shape[-2], h0.shape[-1]
    ct = torch.promote_types(g.dtype, torch.float32)  # (M, rows, n): small, combined in float32
    through_y = _row_dots(y0.to(g.dtype).expand(*lead, d), g).to(ct) * _per_token(b0, lead, (n,), ct).unsqueeze(1)
    r_t = _per_token(r0, lead, (n, n), ct)
    return torch.baddbmm(through_y, _dots(g, h0.to(g.dtype), lead).to(ct), r_t.transpose(1, 2)).to(g.dtype)


def _row_dots(y: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``g_i . y`` per token, ``(M, rows, 1)`` for ``y`` ``(..., D)`` and ``g`` ``(M, rows, D)``, as
    ``y^T G^T`` (the vector on the left: several times faster on CPU BLAS than ``G y``)."""
    return torch.bmm(y.reshape(-1, 1, y.shape[-1]), g.transpose(1, 2)).transpose(1, 2)


def _streams_and_y_grads(
    g: torch.Tensor, r: torch.Tensor, b: torch.Tensor | None, lead: torch.Size, need: tuple[bool, bool]
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``dH = R^T G`` ``(M, n, D)`` and ``dy = b^T G`` ``(M, D)`` per token; when both are needed,
    from one product ``[R^T; b^T] G`` (``G`` read once; the two are views of its result)."""
    n, dtype = g.shape[1], g.dtype
    if all(need):
        both_lead = torch.broadcast_shapes(r.shape[:-2], b.shape[:-1])
        rt, bt = r.transpose(-1, -2).expand(*both_lead, n, n), b.unsqueeze(-2).expand(*both_lead, 1, n)
        both = torch.bmm(_per_token(torch.cat([rt, bt], dim=-2), lead, (n + 1, n), dtype), g)
        return both[:, :n], both[:, n]
    d_streams = torch.bmm(_per_token(r, lead, (n, n), dtype).transpose(1, 2), g) if need[0] else None
    d_y = torch.bmm(_per_token(b, lead, (n,), dtype).unsqueeze(1), g).squeeze(1) if need[1] else None
    return d_streams, d_y


def _width(streams: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``a . H`` as a new ``(..., D)`` tensor (the forward of :class:`WidthConnection`)."""
    lead, n, d = streams.shape[:-2], streams.shape[-2], streams.shape[-1]
    h = _tokens(streams)
    a_t = _per_token(a, lead, (n,), streams.dtype).unsqueeze(1)  # (M, 1, n)
    # Write into the final shape: an output that is a view would forbid in-place use later.
    x = streams.new_empty(*lead, d)
    if expanded_streams(h):
        torch.mul(h[:, 0], a_t.sum(-1), out=x.view(-1, d))
    else:
        torch.bmm(a_t, h, out=x.view(-1, 1, d))
    return x


class WidthConnection(torch.autograd.Function):
    """``x = a . H``: forward ``bmm(a, H)``; backward ``dH = a (x) dx``, ``da_k = H_k . dx``."""

    @staticmethod
    def forward(ctx, streams: torch.Tensor, a: torch.Tensor, source: tuple | None = None) -> torch.Tensor:
        x = _width(streams, a)
        ctx.shape, ctx.dtype = streams.shape, streams.dtype
        save_streams(ctx, streams if ctx.needs_input_grad[1] else None, source if ctx.needs_input_grad[1] else None, a)
        return x

    @staticmethod
    def backward(ctx, gx: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        lead, n = ctx.shape[:-2], ctx.shape[-2]
        g = gx.reshape(-1, 1, gx.shape[-1])  # (M, 1, D)
        (a,), streams = saved_streams(ctx, 1, direct=True)
        a_t = _per_token(a, lead, (n,), ctx.dtype).unsqueeze(-1)  # (M, n, 1)
        d_streams = (a_t * g).reshape(ctx.shape) if ctx.needs_input_grad[0] else None
        d_a = None
        if ctx.needs_input_grad[1]:
            d_a = _grad_to(_dots(g, streams, lead).squeeze(1), a, lead)  # H_k . dx
        return d_streams, d_a, None


class WidthPass(torch.autograd.Function):
    """``x = a . H``, and ``H`` passed through (a view) for the site's depth side to read.

    The depth side then reads the streams *through* this Function, so the streams have one
    consumer and their gradient ``dH = dH_pass + a (x) dx`` is one ``addcmul`` here instead of
    ``a (x) dx`` materialised and then added to the depth side's gradient by autograd.
    """

    @staticmethod
    def forward(ctx, streams: torch.Tensor, a: torch.Tensor, source: tuple | None = None):  # type: ignore[override]
        ctx.set_materialize_grads(False)
        x = _width(streams, a)
        ctx.shape, ctx.dtype = streams.shape, streams.dtype
        keep = ctx.needs_input_grad[1]
        save_streams(ctx, streams if keep else None, source if keep else None, a)
        return x, streams.view_as(streams)

    @staticmethod
    def backward(ctx, gx, g_streams):  # type: ignore[override]
        lead, n, d = ctx.shape[:-2], ctx.shape[-2], ctx.shape[-1]
        (a,), streams = saved_streams(ctx, 1, direct=True)
        d_streams = d_a = None
        if gx is not None:
            g = gx.reshape(-1, 1, d).to(ctx.dtype)  # (M, 1, D)
            if ctx.needs_input_grad[0]:
                a_t = _per_token(a, lead, (n,), ctx.dtype).unsqueeze(-1)  # (M, n, 1)
                if g_streams is None:
                    d_streams = (a_t * g).reshape(ctx.shape)
                else:
                    d_streams = torch.addcmul(_tokens(g_streams.to(ctx.dtype)), a_t, g).reshape(ctx.shape)
            if ctx.needs_input_grad[1]:
                d_a = _grad_to(_dots(g, streams, lead).squeeze(1), a, lead)
        elif ctx.needs_input_grad[0] and g_streams is not None:
            d_streams = g_streams
        return d_streams, d_a, None


class DepthWidth(torch.autograd.Function):
    """One site's depth connection and the next site's width connection, in one Function:
    ``H' = R H + b (x) y`` and ``x' = a' . H'`` (``a'`` not depending on ``H'``).

    Backward takes the gradient of ``H'`` once: ``G = dH' + a' (x) dx'``, then ``dH = R^T G``,
    ``dR = G H^T``, ``db_j = G_j . y``, ``dy = b^T G``, and ``da'_j = H'_j . dx'`` from what is
    saved anyway (``H'_j . dx' = sum_k R_jk (H_k . dx') + b_j (y . dx')``), so ``H'`` is not saved.
    """

    @staticmethod
    def forward(ctx, streams, r, b, y, a_next, source=None):  # type: ignore[override]
        ctx.set_materialize_grads(False)
        new = _depth(streams, r, b, y)
        x = _width(new, a_next)
        ctx.shape, ctx.dtype = streams.shape, streams.dtype
        keep = ctx.needs_input_grad[1] or ctx.needs_input_grad[4]
        save_streams(ctx, streams if keep else None, source if keep else None, r, b, y, a_next)
        return new, x

    @staticmethod
    def backward(ctx, g_new, gx):  # type: ignore[override]
        if g_new is None and gx is None:
            return None, None, None, None, None, None
        (r, b, y, a), streams = saved_streams(ctx, 4, direct=True)
        lead, n, d = ctx.shape[:-2], ctx.shape[-2], ctx.shape[-1]
        g = None if gx is None else gx.reshape(-1, 1, d).to(ctx.dtype)  # (M, 1, D)
        if g is None:
            big = _tokens(g_new.to(ctx.dtype))
        else:
            a_t = _per_token(a, lead, (n,), ctx.dtype).unsqueeze(-1)  # (M, n, 1)
            big = a_t * g if g_new is None else torch.addcmul(_tokens(g_new.to(ctx.dtype)), a_t, g)
        d_a = None
        if ctx.needs_input_grad[4] and g is not None:
            r_t = _per_token(r, lead, (n, n), ctx.dtype)
            b_c = _per_token(b, lead, (n,), ctx.dtype).unsqueeze(-1)  # (M, n, 1)
            y_t = y.to(ctx.dtype).expand(*lead, d).reshape(-1, d, 1)
            dots = torch.baddbmm(b_c * torch.bmm(g, y_t), r_t, _dots(g, streams, lead).transpose(1, 2))
            d_a = _grad_to(dots.squeeze(-1), a, lead)
        return *_depth_grads(ctx, big, streams, r, b, y), d_a, None


def _depth_grads(ctx, g: torch.Tensor, streams, r: torch.Tensor, b: torch.Tensor | None, y: torch.Tensor | None):
    """``dH = R^T G``, ``dR = G H^T``, ``db_j = G_j . y``, ``dy = b^T G`` for ``G`` ``(M, n, D)``
    (the gradient of ``H' = R H + b (x) y``), as ``ctx.needs_input_grad[:4]`` asks; ``G`` is read
    by two products when ``dH`` and ``dy`` are both needed (:func:`_streams_and_y_grads`)."""
    lead, d = ctx.shape[:-2], ctx.shape[-1]
    needs = ctx.needs_input_grad
    d_streams, d_y = _streams_and_y_grads(g, r, b, lead, (needs[0], y is not None and needs[3]))
    d_r = _grad_to(_dots(g, streams, lead), r, lead) if needs[1] else None  # G_j . H_k
    d_b = None
    if y is not None and needs[2]:
        d_b = _grad_to(_row_dots(y.to(ctx.dtype).expand(*lead, d), g).squeeze(-1), b, lead)
    if d_streams is not None:
        d_streams = d_streams.reshape(ctx.shape)
    return d_streams, d_r, d_b, None if d_y is None else _grad_to(d_y, y, lead)


class DepthConnection(torch.autograd.Function):
    """``H' = R H (+ b (x) y)``: forward ``bmm(R, H)`` then ``addcmul_(b, y)``; backward
    ``dH = R^T dH'``, ``dR = dH' H^T``, ``db_j = dH'_j . y``, ``dy = b^T dH'`` (all per token).
    ``b`` and ``y`` may both be ``None`` (:func:`stream_mix`)."""

    @staticmethod
    def forward(ctx, streams, r, b, y, source=None):  # type: ignore[override]
        result = _depth(streams, r, b, y)
        ctx.shape, ctx.dtype = streams.shape, streams.dtype
        save_streams(
            ctx, streams if ctx.needs_input_grad[1] else None, source if ctx.needs_input_grad[1] else None, r, b, y
        )
        return result

    @staticmethod
    def backward(ctx, g_out):  # type: ignore[override]
        (r, b, y), streams = saved_streams(ctx, 3, direct=True)
        return *_depth_grads(ctx, _tokens(g_out.to(ctx.dtype)), streams, r, b, y), None


class Outer(torch.autograd.Function):
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
            d_b = _grad_to(_row_dots(y, g).squeeze(-1), b, lead)
        if ctx.needs_input_grad[1]:
            b_t = _per_token(b, lead, (n,), y.dtype).unsqueeze(1)  # (M, 1, n)
            d_y = torch.bmm(b_t, g).reshape(y.shape)
        return d_b, d_y
