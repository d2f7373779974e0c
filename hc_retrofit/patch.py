"""`convert()`: retrofit hyper-connections into a loaded transformers causal LM, in place.

How a converted decoder layer runs (streams ``H`` have shape ``(B, T, n, D)`` between layers)::

    layer 0 input h (B, T, D)  --expand (a view, no copy)-->  H
    site 0:  x0 = a0 . H             fed to the site's entry modules (e.g. input_layernorm)
             the layer's residual is R0 H (we call the original forward with it)
             exits return b0 (x) y0, so the layer's own add gives  R0 H + b0 y0
    site s:  (later branches) the entry hook reads H_s, feeds x_s = a_s . H_s; the exit returns
             (R_s - I) H_s + b_s (x) y_s, so the layer's own add gives  R_s H_s + b_s y_s
    last layer output  --reduce (mean over streams)-->  (B, T, D), into the final norm

Attention and MLP therefore only ever see ``(B, T, D)`` tensors: they run once, masks/rotary/KV
cache/``generate()`` are untouched, and the original parameter names are unchanged (HC parameters
are new keys ``<layer>.hyper_connections.<site>.*``).

The HC work of a layer happens inside the layer's ``forward`` (we give each decoder layer a
subclass of its own class), so transformers' gradient checkpointing, which wraps ``forward``,
recomputes it too. Per-call state lives on the site module only for the duration of that call.
Hooks are ``functools.partial`` objects bound to their site, so ``copy.deepcopy`` of a converted
model gives a model whose hooks use the copy's own HC parameters.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hc_retrofit.config import HCConfig
from hc_retrofit.connections import (
    Coefficients,
    HyperConnection,
    _DepthConnection,
    _Recomputed,
    _WidthConnection,
    depth_connection,
    expand_streams,
    outer_streams,
    reduce_streams,
    stream_mix,
    width_connection,
)
from hc_retrofit.errors import AlreadyConvertedError, UnsupportedArchitectureError
from hc_retrofit.families import Block, Family, family_for

CONFIG_KEY = "hc_retrofit"


@dataclass
class _Call:
    """What one site remembers between its entry and its exit during one layer call."""

    x: torch.Tensor
    r: torch.Tensor  # R for the routed site; R - I for the others, which add (R - I) H at the exit
    b: torch.Tensor
    streams: torch.Tensor | None  # only for non-routed sites
    source: tuple | None = None  # non-routed: what ``streams`` are recomputed from, see _recompute_source
    # The routed site: what the layer's mid-layer streams R H + b (x) y are made of.
    inputs: torch.Tensor | None = None
    mixed: torch.Tensor | None = None
    y: torch.Tensor | None = None
    outer: torch.Tensor | None = None


def _set_call(site: HyperConnection, call: _Call | None, routed: _Call | None = None) -> None:
    # Straight into __dict__: nn.Module.__setattr__ costs more than the HC maths at decode.
    site.__dict__["_hc_call"] = call
    site.__dict__["_hc_routed"] = routed


def _recompute_source(routed: _Call | None, streams: torch.Tensor) -> tuple | None:
    """``(_Recomputed(), (H0, R0, b0, y0))`` if ``streams`` are exactly ``R0 H0 + b0 (x) y0`` of the routed site.

    True when the layer added the routed site's two outputs unchanged: the autograd node of
    ``streams`` is one ``add`` (alpha 1) of exactly those two tensors, same shape and dtype. Then
    the non-routed site recomputes its streams in backward from tensors saved anyway instead of
    saving them (``n x D`` per token and layer). Anything in between (dropout, a residual
    multiplier, an in-place change) makes it ``None``, and the streams are saved as usual.
    """
    if routed is None or routed.mixed is None or routed.outer is None:
        return None
    node = streams.grad_fn
    if node is None or node.name() != "AddBackward0" or getattr(node, "_saved_alpha", None) != 1:
        return None
    parents = [f for f, _ in node.next_functions]
    mix_node, outer_node = routed.mixed.grad_fn, routed.outer.grad_fn
    if mix_node is None or outer_node is None or len(parents) != 2:
        return None
    if not (
        (parents[0] is mix_node and parents[1] is outer_node) or (parents[0] is outer_node and parents[1] is mix_node)
    ):
        return None
    if not (streams.shape == routed.mixed.shape == routed.outer.shape):
        return None
    if not (streams.dtype == routed.mixed.dtype == routed.outer.dtype):
        return None
    return _Recomputed(), (routed.inputs, routed.r, routed.b, routed.y)


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _replace_first(output: Any, value: torch.Tensor) -> Any:
    return (value, *output[1:]) if isinstance(output, tuple) else value


def _split_hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: tuple, kwargs: dict, value: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (value, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": value}


def _coefficients(site: HyperConnection, streams: torch.Tensor, minus_identity: bool = False) -> Coefficients:
    """The site's coefficients for ``streams`` (``R - I`` in place of ``R`` if ``minus_identity``):
    float32 with autograd; without it (evaluation, ``generate()``) from the site's cache where they
    do not depend on ``streams``, already in the streams' dtype."""
    if not torch.is_grad_enabled():
        return site._no_grad_coefficients(streams, streams.dtype, minus_identity)
    c = site.coefficients(streams)
    return _minus_identity(c) if minus_identity else c


def _minus_identity(c: Coefficients) -> Coefficients:
    """``c`` with ``R - I`` in place of ``R`` (what a non-routed site's exit adds: ``(R - I) H``)."""
    n = c.r.shape[-1]
    c.r = c.r - torch.eye(n, device=c.r.device, dtype=c.r.dtype)
    return c


class HCDecoderLayerMixin:
    """Mixed into each decoder layer's class by :func:`convert`; see the module docstring."""

    hyper_connections: nn.ModuleList
    _hc_block: Block
    _hc_first: bool
    _hc_last: bool
    _hc_multiplier: float

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden = _split_hidden(args, kwargs)
        first_site: HyperConnection = self.hyper_connections[0]
        streams = expand_streams(hidden, first_site.num_streams) if self._hc_first else hidden
        coeffs = _coefficients(first_site, streams)
        x = width_connection(streams, coeffs.a)
        try:
            if self._hc_block.kind == "layer":
                new_args, new_kwargs = _with_hidden(args, kwargs, x)
                out = super().forward(*new_args, **new_kwargs)
                # F(x) = layer(x) - x, so H' = R H + b F(x) = (R H - b x) + b layer(x): exact at init.
                # (R H - b x) first: with equal streams it is exactly 0 at init, so H' = layer(x) exactly.
                new = depth_connection(streams, coeffs.r, -coeffs.b, x) + outer_streams(coeffs.b, _first(out))
            else:
                routed = _Call(x, coeffs.r, coeffs.b, streams=None, inputs=streams)
                routed.mixed = stream_mix(streams, coeffs.r)
                _set_call(first_site, routed)
                for site in self.hyper_connections[1:]:
                    _set_call(site, None, routed)
                new_args, new_kwargs = _with_hidden(args, kwargs, routed.mixed)
                out = super().forward(*new_args, **new_kwargs)
                new = _first(out)
        finally:
            for site in self.hyper_connections:
                _set_call(site, None)
        if self._hc_last:
            new = reduce_streams(new)
        return _replace_first(out, new)


@functools.cache
def _hc_layer_class(cls: type) -> type:
    """``cls`` with :class:`HCDecoderLayerMixin` in front (one class per original class).

    It keeps the original class *name*: accelerate/FSDP auto-wrap policies and transformers'
    ``_no_split_modules`` (``device_map="auto"``) find decoder layers by class name.
    """
    return type(
        cls.__name__, (HCDecoderLayerMixin, cls), {"__module__": cls.__module__, "__qualname__": cls.__qualname__}
    )


def _entry_hook(site: HyperConnection, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook on an entry module: feed it ``x = a . H`` instead of the streams."""
    call: _Call | None = site._hc_call
    if call is None:  # first entry of a non-routed site: read H_s here
        streams = _split_hidden(args, kwargs)
        if torch.is_grad_enabled() and (source := _recompute_source(site._hc_routed, streams)) is not None:
            c = _minus_identity(site._coefficients(streams, source))
            call = _Call(_WidthConnection.apply(streams, c.a, source), c.r, c.b, streams, source)
        else:
            c = _coefficients(site, streams, minus_identity=True)
            call = _Call(width_connection(streams, c.a), c.r, c.b, streams)
        _set_call(site, call)
    return _with_hidden(args, kwargs, call.x)


def _exit_hook(
    site: HyperConnection, multiplier: float, module: nn.Module, args: tuple, kwargs: dict, output: Any
) -> Any:
    """Forward hook on an exit module: turn the branch output ``y`` into what the layer must add."""
    call: _Call = site._hc_call
    y = _first(output)
    if call.streams is None:  # routed site: the layer adds R H itself
        call.y, call.outer = y, outer_streams(call.b, y)
        return _replace_first(output, call.outer)
    if call.source is not None:  # (R - I) H, H recomputed in backward
        delta = _DepthConnection.apply(call.streams, call.r, None, None, call.source)
    else:
        delta = stream_mix(call.streams, call.r)  # (R - I) H
    if multiplier != 1.0:  # the layer computes H + m * exit
        delta = delta / multiplier
    b = call.b if call.b.dtype == y.dtype else call.b.to(y.dtype)
    return _replace_first(output, delta.addcmul_(b.unsqueeze(-1), y.unsqueeze(-2)))


def is_converted(model: nn.Module) -> bool:
    """Whether ``model`` already carries hyper-connections."""
    return getattr(model, "hc_config", None) is not None or any(
        isinstance(m, HCDecoderLayerMixin) for m in model.modules()
    )


def decoder_layers(model: nn.Module, family: Family | None = None) -> nn.ModuleList:
    """The decoder-layer list of ``model`` as its family adapter names it."""
    family = family or family_for(model.config)
    try:
        layers = model.get_submodule(family.layers)
    except AttributeError as err:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} has no {family.layers!r}: pass a *ForCausalLM model "
            f"(e.g. AutoModelForCausalLM) of type {model.config.model_type!r}"
        ) from err
    return layers


def hyper_connection_sites(model: nn.Module) -> list[HyperConnection]:
    """Every :class:`HyperConnection` of a converted model, in network order."""
    return [m for m in model.modules() if isinstance(m, HyperConnection)]


def convert(model: nn.Module, config: HCConfig | None = None) -> nn.Module:
    """Retrofit hyper-connections into ``model`` (in place) and return it.

    ``model`` is a loaded transformers causal LM of a supported family (see
    :func:`hc_retrofit.families.supported_model_types`). At initialisation the converted model
    computes the same function as the original (see :mod:`hc_retrofit.connections`); its HC
    parameters are float32 and on the device of each layer. The settings are recorded in
    ``model.config.hc_retrofit`` and ``model.hc_config``.

    Raises:
        UnsupportedArchitectureError: the family has no adapter.
        AlreadyConvertedError: ``model`` was converted before.
        ConfigError: invalid settings.
    """
    config = config or HCConfig()
    if not isinstance(config, HCConfig):
        raise TypeError(f"config must be an HCConfig, got {type(config).__name__}")
    if is_converted(model):
        raise AlreadyConvertedError(
            f"this {type(model).__name__} already has hyper-connections; convert the original model instead"
        )
    family = family_for(model.config)
    block = family.block_for(model.config)
    multiplier = family.multiplier_for(model.config)
    layers = decoder_layers(model, family)
    for layer in layers:  # check every layer before changing any: a refusal leaves the model as it was
        for spec in block.sites:
            entries = [getattr(layer, name, None) for name in spec.entries]
            exits = [getattr(layer, name, None) for name in spec.exits]
            if not any(isinstance(m, nn.Module) for m in entries) or not all(isinstance(m, nn.Module) for m in exits):
                raise UnsupportedArchitectureError(
                    f"{type(layer).__name__} does not have the submodules the {model.config.model_type!r} "
                    f"adapter expects ({', '.join(spec.entries + spec.exits)}); is this transformers version supported?"
                )
    dim = model.config.hidden_size
    site_index = 0
    for i, layer in enumerate(layers):
        ref = next(layer.parameters())
        n_sites = max(1, len(block.sites))
        sites = nn.ModuleList(HyperConnection(dim, config, site_index + s) for s in range(n_sites))
        site_index += n_sites
        sites.to(device=ref.device)
        layer.__class__ = _hc_layer_class(type(layer))
        layer.hyper_connections = sites
        layer._hc_block, layer._hc_multiplier = block, multiplier
        layer._hc_first, layer._hc_last = i == 0, i == len(layers) - 1
        for site, spec in zip(sites, block.sites, strict=False):
            for name in spec.entries:
                if isinstance(module := getattr(layer, name, None), nn.Module):
                    module.register_forward_pre_hook(functools.partial(_entry_hook, site), with_kwargs=True)
            for name in spec.exits:
                getattr(layer, name).register_forward_hook(
                    functools.partial(_exit_hook, site, multiplier), with_kwargs=True
                )
        for site in sites:
            _set_call(site, None)
    model.hc_config = config
    model.config.hc_retrofit = config.to_dict()
    return model
