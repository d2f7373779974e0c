"""The converted decoder layer: its class, its ``forward`` and the per-call state its site hooks share.

How a converted decoder layer runs (streams ``H`` have shape ``(B, T, n, D)`` between layers)::

    layer 0 input h (B, T, D)  --expand (a view, no copy)-->  H
    site 0:  x0 = a0 . H             fed to the site's entry modules (e.g. input_layernorm)
    beside the layer (blocks whose output is their input plus their exits' outputs):
             the layer runs on x0, a (B, T, D) tensor; the exit of site s computes
             H_s+1 = R_s H_s + b_s (x) y_s and the next site's x_s+1 = a_s+1 . H_s+1 (one
             pass), and the layer's own adds see only (B, T, D) tensors nobody reads
    otherwise the layer adds the streams: it receives R0 H, site 0's exits return b0 (x) y0,
             later sites' entry hooks read H_s and their exits return (R_s - I) H_s + b_s (x) y_s
    last layer output  --reduce (mean over streams)-->  (B, T, D), into the final norm

Attention and MLP therefore only ever see ``(B, T, D)`` tensors: they run once, masks/rotary/KV
cache/``generate()`` are untouched, and the original parameter names are unchanged (HC parameters
are new keys ``<layer>.hyper_connections.<site>.*``).

The HC work of a layer happens inside the layer's ``forward`` (we give each decoder layer a
subclass of its own class, :func:`hc_layer_class`), so transformers' gradient checkpointing, which
wraps ``forward``, recomputes it too. The layer and its hooks (:func:`entry_hook`,
:func:`exit_hook`) talk to the sites only through the site API of :mod:`.site`
(``width_connection``, ``advance``, ``mix``, ``outer``, ``delta``, ``depth_around``). Per-call
state (each site's context between its entry and exit) is filled and emptied by the layer's
``forward`` in a per-layer :class:`LayerCalls`. Whether the streams stay beside the layer, and what
is recomputed in backward, is decided at convert time from the block structure
(:mod:`.stream_placement`): the hot path has no autograd-graph inspection, ``try`` or hidden
state, so ``torch.compile`` traces a converted layer in one graph. Hooks are ``functools.partial``
objects bound to their site and layer state, so ``copy.deepcopy`` of a converted model gives a
model whose hooks use the copy's own HC parameters.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from .families import Block
from .site import HyperConnection, SiteContext
from .stream_ops import expand_streams, reduce_streams
from .stream_placement import beside_layer, recomputes


class LayerCalls:
    """The per-call state of one converted layer, shared with its hooks.

    The layer's ``forward`` fills it at the start of every call and empties it at the end (plain
    attribute stores, which ``torch.compile`` traces as ordinary side effects). ``contexts[s]``:
    site ``s`` between its entry and its exit (site 0 from the start). ``beside``: this call keeps
    the streams beside the layer (see :func:`~.stream_placement.beside_layer`); then ``streams`` holds the latest streams
    (the layer's input until the first exit),
    ``sites`` the layer's sites, and ``recompute`` says whether the second site recomputes its
    streams in backward (:func:`~.stream_placement.recomputes`).
    """

    def __init__(self, num_sites: int) -> None:
        self.num_sites = num_sites
        self.reset()

    def reset(
        self,
        first: SiteContext | None = None,
        *,
        beside: bool = False,
        recompute: bool = False,
        sites: tuple[HyperConnection, ...] | None = None,
    ) -> None:
        self.beside, self.recompute, self.sites = beside, recompute, sites
        self.streams = None if first is None else first.streams
        self.contexts: list[SiteContext | None] = [first] + [None] * (self.num_sites - 1)


def first_output(output: Any) -> torch.Tensor:
    """The hidden states in a module's output (its first item when it returns a tuple or list)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def replace_first_output(output: Any, value: torch.Tensor) -> Any:
    """``output`` with ``value`` as its first item (a tuple stays a tuple; openai-gpt's blocks return lists)."""
    if isinstance(output, list):
        return [value, *output[1:]]
    return (value, *output[1:]) if isinstance(output, tuple) else value


def hidden_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a module was called with (first positional argument, else ``hidden_states=``)."""
    return args[0] if args else kwargs["hidden_states"]


def with_hidden_input(args: tuple, kwargs: dict, value: torch.Tensor) -> tuple[tuple, dict]:
    """The call's ``(args, kwargs)`` with ``value`` in place of its hidden states."""
    if args:
        return (value, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": value}


class HCDecoderLayerMixin:
    """Mixed into each decoder layer's class by :func:`~.patch.apply_family`; see the module docstring."""

    hyper_connections: nn.ModuleList
    _hc_block: Block
    _hc_first: bool
    _hc_last: bool
    _hc_multiplier: float
    _hc_calls: LayerCalls
    _hc_recompute: bool

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden = hidden_input(args, kwargs)
        sites = tuple(self.hyper_connections)  # (the hooks index a tuple: no ModuleList lookups per token)
        first_site: HyperConnection = sites[0]
        streams = expand_streams(hidden, first_site.num_streams) if self._hc_first else hidden
        x, ctx = first_site.width_connection(streams)
        if self._hc_block.kind == "layer":
            new_args, new_kwargs = with_hidden_input(args, kwargs, x)
            out = super().forward(*new_args, **new_kwargs)
            new = first_site.depth_around(ctx, first_output(out))  # F(x) = layer(x) - x
        elif beside_layer(self):  # the hooks compute the streams; the layer's adds see (B, T, D) only
            calls = self._hc_calls
            calls.reset(ctx, beside=True, recompute=recomputes(self), sites=sites)
            new_args, new_kwargs = with_hidden_input(args, kwargs, x)
            out = super().forward(*new_args, **new_kwargs)
            new = calls.streams
            calls.reset()  # (an exception above leaves it filled until the next call resets it)
        else:  # the layer adds the streams: it receives R H, its exits return what it must add
            calls = self._hc_calls
            calls.reset(ctx)
            new_args, new_kwargs = with_hidden_input(args, kwargs, first_site.mix(ctx))
            out = super().forward(*new_args, **new_kwargs)
            new = first_output(out)
            calls.reset()
        if self._hc_last:
            new = reduce_streams(new)
        return replace_first_output(out, new)

    def __setattr__(self, name: str, value: Any) -> None:
        """Hooks follow their child's name: a child replaced after conversion (vLLM swaps norms, linears
        and attention for its own; peft wraps modules) gets the site hooks its predecessor had."""
        old = self.__dict__.get("_modules", {}).get(name)
        super().__setattr__(name, value)
        surgery = self.__dict__.get("_hc_surgery")
        if surgery is None or old is None or value is old or not isinstance(value, nn.Module):
            return
        for hook in surgery.hooks:
            if hook.child == name:
                hook.detach()
                hook.attach(value)

    def __reduce_ex__(self, protocol: Any) -> Any:
        """Pickle as "a converted layer of the original class" plus its state, so ``torch.load`` in a
        new process rebuilds the class (generated at conversion) from the importable original."""
        return _rebuild_layer, (self._hc_surgery.original_class,), self.__getstate__()


@functools.cache
def hc_layer_class(cls: type) -> type:
    """``cls`` with :class:`HCDecoderLayerMixin` in front, named ``HC<name>`` (one class per original class).

    The class is a global of this module under its own name, so ``type(layer)`` and ``repr`` say what
    the layer is and pickling finds it (see :meth:`HCDecoderLayerMixin.__reduce_ex__` for a new
    process). :func:`~.patch.apply_family` adds the name to the model's ``_no_split_modules``, where accelerate's
    FSDP auto-wrap policy and transformers' ``device_map="auto"`` look for decoder layers by name.
    """
    name = f"HC{cls.__name__}"
    hc_cls = type(name, (HCDecoderLayerMixin, cls), {"__module__": __name__, "__qualname__": name})
    globals().setdefault(name, hc_cls)
    return hc_cls


def _rebuild_layer(original: type) -> nn.Module:
    """Unpickling half of :meth:`HCDecoderLayerMixin.__reduce_ex__`: an empty converted layer of ``original``."""
    return object.__new__(hc_layer_class(original))


def entry_hook(
    calls: LayerCalls, index: int, site: HyperConnection, module: nn.Module, args: tuple, kwargs: dict
) -> tuple[tuple, dict]:
    """Forward pre-hook on an entry module: feed it ``x = a . H`` instead of the streams."""
    ctx = calls.contexts[index]
    if ctx is not None and (args[0] if args else kwargs.get("hidden_states")) is ctx.x:
        return None  # fed x already (site 0's entry, beside the layer: x is the layer's input)
    if ctx is None:  # first entry of a site whose x is not computed yet: read H_s here
        if calls.beside:
            _, ctx = site.width_connection(calls.streams)
        else:
            _, ctx = site.width_connection(hidden_input(args, kwargs), adds_input=True)
        calls.contexts[index] = ctx
    return with_hidden_input(args, kwargs, ctx.x)


def exit_hook(
    calls: LayerCalls,
    index: int,
    site: HyperConnection,
    multiplier: float,
    module: nn.Module,
    args: tuple,
    kwargs: dict,
    output: Any,
) -> Any:
    """Forward hook on an exit module: the branch output ``y`` updates the streams.

    Beside the layer: ``H' = R H + b (x) y`` (and the next site's ``x``) here, the output left as
    it is. Otherwise the output becomes what the layer must add: ``b (x) y`` on the site whose
    ``R H`` the layer received, ``(R - I) H + b (x) y`` on the others.
    """
    ctx = calls.contexts[index]
    y = first_output(output)
    if calls.beside:
        following = calls.sites[index + 1] if index + 1 < calls.num_sites else None
        calls.streams, _, next_ctx = site.advance(ctx, y, following, recompute=calls.recompute and index == 0)
        if following is not None:
            calls.contexts[index + 1] = next_ctx
        return output
    if index == 0:  # the layer adds R H (its input) itself
        return replace_first_output(output, site.outer(ctx, y))
    return replace_first_output(output, site.delta(ctx, y, multiplier))  # the layer adds H + m * delta
