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
recomputes it too. The layer talks to its sites only through the site API of
:mod:`hc_retrofit.site` (``width_connection``, ``mix``, ``outer``, ``delta``, ``depth_around``). Per-call state
(each site's context between its entry and exit) is filled and emptied by the layer's ``forward``
in a per-layer :class:`_LayerCalls`. What can be recomputed in backward is decided at convert time
from the block structure: the hot path has no autograd-graph inspection, ``try`` or hidden state,
so ``torch.compile`` traces a converted layer in one graph. Hooks are ``functools.partial`` objects
bound to their site and layer state, so ``copy.deepcopy`` of a converted model gives a model whose
hooks use the copy's own HC parameters.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from .config import HCConfig
from .errors import AlreadyConvertedError, UnsupportedArchitectureError
from .families import STRUCTURE_KEY, Block, Family, family_for
from .site import HyperConnection, SiteContext
from .stream_ops import expand_streams, reduce_streams


class _LayerCalls:
    """The per-call state of one converted layer, shared with its hooks.

    The layer's ``forward`` fills it at the start of every call and empties it at the end (plain
    attribute stores, which ``torch.compile`` traces as ordinary side effects). ``contexts[s]``:
    site ``s`` between its entry and its exit (site 0, the *routed* site whose ``R H`` the layer
    receives as input, from the start); ``y0``: the routed site's branch output, kept when this
    call lets the second site recompute its streams in backward (``recompute``, see
    :func:`_recomputes`).
    """

    def __init__(self, num_sites: int) -> None:
        self.num_sites = num_sites
        self.reset()

    def reset(self, routed: SiteContext | None = None, recompute: bool = False) -> None:
        self.recompute, self.y0 = recompute, None
        self.contexts: list[SiteContext | None] = [routed] + [None] * (self.num_sites - 1)


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _replace_first(output: Any, value: torch.Tensor) -> Any:
    """``output`` with ``value`` as its first item (a tuple stays a tuple; openai-gpt's blocks return lists)."""
    if isinstance(output, list):
        return [value, *output[1:]]
    return (value, *output[1:]) if isinstance(output, tuple) else value


def _split_hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: tuple, kwargs: dict, value: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (value, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": value}


def _recomputes(layer: nn.Module) -> bool:
    """Whether this (eager, autograd) call may recompute the second site's streams in backward.

    The second site's input is ``H_1 = R_0 H_0 + b_0 (x) y_0``, the layer's add of the first site's
    two outputs, when the block adds its branch output to its input unchanged: decided at convert
    time (``_hc_recompute``: a sequential, sandwich or post-norm block without a residual
    multiplier). Dropout is the one thing that may sit between the branch output and the add
    (phi3's ``resid_attn_dropout``, falcon's ``dropout_add``), so a training layer with any active
    dropout outside its branches (a module, or a config probability) saves ``H_1`` instead.
    """
    if not layer._hc_recompute or torch.compiler.is_compiling() or not torch.is_grad_enabled():
        return False
    if not layer.training:
        return True
    config = layer._hc_config
    return not any(m.p > 0 for m in layer._hc_dropouts) and not any(
        getattr(config, k, 0) > 0 for k in layer._hc_dropout_keys
    )


class HCDecoderLayerMixin:
    """Mixed into each decoder layer's class by :func:`convert`; see the module docstring."""

    hyper_connections: nn.ModuleList
    _hc_block: Block
    _hc_first: bool
    _hc_last: bool
    _hc_multiplier: float
    _hc_calls: _LayerCalls
    _hc_recompute: bool

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden = _split_hidden(args, kwargs)
        first_site: HyperConnection = self.hyper_connections[0]
        streams = expand_streams(hidden, first_site.num_streams) if self._hc_first else hidden
        x, ctx = first_site.width_connection(streams)
        if self._hc_block.kind == "layer":
            new_args, new_kwargs = _with_hidden(args, kwargs, x)
            out = super().forward(*new_args, **new_kwargs)
            new = first_site.depth_around(ctx, _first(out))  # F(x) = layer(x) - x
        else:
            calls = self._hc_calls
            calls.reset(ctx, _recomputes(self))
            new_args, new_kwargs = _with_hidden(args, kwargs, first_site.mix(ctx))
            out = super().forward(*new_args, **new_kwargs)
            new = _first(out)
            calls.reset()  # (an exception above leaves it filled until the next call resets it)
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


def _entry_hook(
    calls: _LayerCalls, index: int, site: HyperConnection, module: nn.Module, args: tuple, kwargs: dict
) -> tuple[tuple, dict]:
    """Forward pre-hook on an entry module: feed it ``x = a . H`` instead of the streams."""
    ctx = calls.contexts[index]
    if ctx is None:  # first entry of a non-routed site: read H_s here
        made_of = None
        if index == 1 and calls.recompute and calls.y0 is not None:
            made_of = (calls.contexts[0], calls.y0)  # H_1 = R_0 H_0 + b_0 (x) y_0
        _, ctx = site.width_connection(_split_hidden(args, kwargs), adds_input=True, made_of=made_of)
        calls.contexts[index] = ctx
    return _with_hidden(args, kwargs, ctx.x)


def _exit_hook(
    calls: _LayerCalls,
    index: int,
    site: HyperConnection,
    multiplier: float,
    module: nn.Module,
    args: tuple,
    kwargs: dict,
    output: Any,
) -> Any:
    """Forward hook on an exit module: turn the branch output ``y`` into what the layer must add."""
    ctx = calls.contexts[index]
    y = _first(output)
    if index == 0:  # routed site: the layer adds R H (its input) itself
        if calls.recompute:
            calls.y0 = y
        return _replace_first(output, site.outer(ctx, y))
    return _replace_first(output, site.delta(ctx, y, multiplier))  # the layer adds H + m * delta


def _recompute_allowed(block: Block, multiplier: float) -> bool:
    """Whether the block's structure makes the second site's input ``R_0 H_0 + b_0 (x) y_0`` exactly.

    True for blocks that add one branch output to their input unchanged (sequential, sandwich,
    post-norm; one exit on the first site) without a residual multiplier; dropout between the two
    is checked per call (see :func:`_recomputes`).
    """
    return (
        block.kind in ("sequential", "sandwich", "post_norm")
        and len(block.sites) > 1
        and len(block.sites[0].exits) == 1
        and multiplier == 1.0
    )


def _dropout_keys(config: Any) -> tuple[str, ...]:
    """The config's dropout probabilities (``*dropout*``, ``*pdrop*``) a layer's functional dropout
    may use (all but the ones of the embeddings and classification heads, outside the layers)."""
    return tuple(
        k
        for k, v in vars(config).items()
        if ("dropout" in k or "pdrop" in k)
        and not any(outside in k for outside in ("classifier", "summary", "embd", "embed"))
        and isinstance(v, (int, float))
        and not isinstance(v, bool)
    )


def _dropouts_outside_branches(layer: nn.Module, block: Block) -> tuple[nn.Dropout, ...]:
    """The layer's dropout modules that are not inside an entry or exit module (they may act on the
    branch output between the exit and the add)."""
    inside = {
        id(m)
        for spec in block.sites
        for name in spec.entries + spec.exits
        if isinstance(root := getattr(layer, name, None), nn.Module)
        for m in root.modules()
    }
    return tuple(m for m in layer.modules() if isinstance(m, nn.modules.dropout._DropoutNd) and id(m) not in inside)


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


def _hidden_size(config: Any) -> int:
    """The width of the residual stream: the text config's ``hidden_size`` (a multimodal config keeps
    the decoder's there, and may have a top-level one of another tower's width), else the config's."""
    text = config.get_text_config() if callable(getattr(config, "get_text_config", None)) else config
    if isinstance(getattr(text, "hidden_size", None), int):
        return text.hidden_size
    return int(config.hidden_size)


def hyper_connection_sites(model: nn.Module) -> list[HyperConnection]:
    """Every :class:`HyperConnection` of a converted model, in network order."""
    return [m for m in model.modules() if isinstance(m, HyperConnection)]


def check_convertible(model: nn.Module, config: HCConfig | None) -> HCConfig:
    """The settings to convert ``model`` with (default :class:`HCConfig`); refuse a wrong type or a converted model."""
    config = config or HCConfig()
    if not isinstance(config, HCConfig):
        raise TypeError(f"config must be an HCConfig, got {type(config).__name__}")
    if is_converted(model):
        raise AlreadyConvertedError(
            f"this {type(model).__name__} already has hyper-connections; convert the original model instead"
        )
    return config


def convert(model: nn.Module, config: HCConfig | None = None, *, family: Family | None = None) -> nn.Module:
    """Retrofit hyper-connections into ``model`` (in place) and return it.

    ``model`` is a loaded transformers causal LM of a supported family (see
    :func:`hc_retrofit.families.supported_model_types`). At initialisation the converted model
    computes the same function as the original (see :mod:`hc_retrofit.connections`); its HC
    parameters are float32 and on the device of each layer. The settings are recorded in
    ``model.config.hc_retrofit`` and ``model.hc_config``. ``family`` (default: the one
    :func:`~hc_retrofit.families.family_for` finds for ``model.config``) says where the sites are.
    This applies the adapter without checking the result; :func:`hc_retrofit.convert` proves it.

    Raises:
        UnsupportedArchitectureError: the family has no adapter.
        AlreadyConvertedError: ``model`` was converted before.
        ConfigError: invalid settings.
    """
    config = check_convertible(model, config)
    family = family or family_for(model.config)
    multiplier = family.multiplier_for(model.config)
    layers = decoder_layers(model, family)
    blocks = family.blocks_for(model.config, len(layers))
    for layer, block in zip(layers, blocks, strict=True):  # check every layer before changing any
        missing = [name for name in block.module_names() if not isinstance(getattr(layer, name, None), nn.Module)]
        if missing:
            raise UnsupportedArchitectureError(
                f"{type(layer).__name__} does not have the submodules the {model.config.model_type!r} "
                f"adapter expects (missing {', '.join(missing)}); is this transformers version supported?"
            )
    dim = _hidden_size(model.config)
    dropout_keys = _dropout_keys(model.config)
    site_index = 0
    for i, (layer, block) in enumerate(zip(layers, blocks, strict=True)):
        ref = next(layer.parameters())
        n_sites = max(1, len(block.sites))
        sites = nn.ModuleList(HyperConnection(dim, config, site_index + s) for s in range(n_sites))
        site_index += n_sites
        sites.to(device=ref.device)
        dropouts = _dropouts_outside_branches(layer, block)
        layer.__class__ = _hc_layer_class(type(layer))
        layer.hyper_connections = sites
        layer._hc_block, layer._hc_multiplier = block, multiplier
        layer._hc_first, layer._hc_last = i == 0, i == len(layers) - 1
        layer._hc_calls = calls = _LayerCalls(n_sites)
        layer._hc_recompute = _recompute_allowed(block, multiplier)  # per layer: hybrid stacks mix blocks
        layer._hc_config, layer._hc_dropout_keys, layer._hc_dropouts = model.config, dropout_keys, dropouts
        for index, (site, spec) in enumerate(zip(sites, block.sites, strict=False)):
            for name in spec.entries:
                if isinstance(module := getattr(layer, name, None), nn.Module):
                    module.register_forward_pre_hook(
                        functools.partial(_entry_hook, calls, index, site), with_kwargs=True
                    )
            for name in spec.exits:
                getattr(layer, name).register_forward_hook(
                    functools.partial(_exit_hook, calls, index, site, multiplier), with_kwargs=True
                )
    model.hc_config = config
    model.config.hc_retrofit = config.to_dict()
    setattr(model.config, STRUCTURE_KEY, family.to_dict(model.config))  # saved checkpoints rebuild this structure
    return model
