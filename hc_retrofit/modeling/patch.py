"""`apply_family()`: retrofit hyper-connections into a loaded transformers model, in place, unchecked;
`remove_hyper_connections()`: undo it.

Conversion gives every decoder layer a subclass of its own class that runs the hyper-connections
(:mod:`.converted_layer`), one :class:`~.site.HyperConnection` per site of the family's block
structure, and forward hooks on the sites' entry and exit modules; everything it does is recorded
(:mod:`.surgery`), so that removal restores the original model object.
"""

from __future__ import annotations

import functools
from typing import Any

from torch import nn

from .config import CONFIG_KEY, HCConfig
from .converted_layer import HCDecoderLayerMixin, LayerCalls, entry_hook, exit_hook, hc_layer_class
from .errors import AlreadyConvertedError, UnsupportedArchitectureError
from .families import STRUCTURE_KEY, Family, family_for
from .site import HyperConnection
from .stream_placement import dropout_keys, dropouts_outside_branches, recompute_allowed
from .surgery import Surgery, add_hook, add_no_split, remove_no_split, undo_layer


def is_converted(model: nn.Module) -> bool:
    """Whether ``model`` already carries hyper-connections."""
    return getattr(model, "hc_config", None) is not None or any(
        isinstance(m, HCDecoderLayerMixin) for m in model.modules()
    )


def decoder_layers(model: nn.Module, family: Family | None = None) -> nn.ModuleList:
    """The decoder-layer list of ``model`` as its family adapter names it.

    The adapter names it from the task model (``model.layers`` in ``LlamaForCausalLM``); in a base
    model (``LlamaModel``, what ``AutoModel`` and serving engines build) the path starts after the
    ``base_model_prefix``.
    """
    family = family or family_for(model.config)
    path = family.layers
    prefix = f"{getattr(model, 'base_model_prefix', '')}."
    if path.startswith(prefix) and getattr(model, "base_model", None) is model and len(prefix) > 1:
        path = path.removeprefix(prefix)
    try:
        layers = model.get_submodule(path)
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


def apply_family(model: nn.Module, config: HCConfig | None = None, *, family: Family | None = None) -> nn.Module:
    """Apply ``family``'s hyper-connection structure to ``model`` (in place, unchecked) and return it.

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
    keys = dropout_keys(model.config)
    site_index = 0
    for i, (layer, block) in enumerate(zip(layers, blocks, strict=True)):
        ref = next(layer.parameters())
        n_sites = max(1, len(block.sites))
        sites = nn.ModuleList(HyperConnection(dim, config, site_index + s) for s in range(n_sites))
        site_index += n_sites
        sites.to(device=ref.device)
        dropouts = dropouts_outside_branches(layer, block)
        surgery = Surgery(type(layer))
        layer.__class__ = hc_layer_class(type(layer))
        layer._hc_surgery = surgery  # first, so that removal undoes a conversion that failed half-way
        layer.hyper_connections = sites
        layer._hc_block, layer._hc_multiplier = block, multiplier
        layer._hc_first, layer._hc_last = i == 0, i == len(layers) - 1
        layer._hc_calls = calls = LayerCalls(n_sites)
        layer._hc_recompute = recompute_allowed(block, multiplier)  # per layer: hybrid stacks mix blocks
        layer._hc_config, layer._hc_dropout_keys, layer._hc_dropouts = model.config, keys, dropouts
        for index, (site, spec) in enumerate(zip(sites, block.sites, strict=False)):
            for name in spec.entries:
                if isinstance(module := getattr(layer, name, None), nn.Module):
                    add_hook(surgery, module, name, "pre", functools.partial(entry_hook, calls, index, site))
            for name in spec.exits:
                hook = functools.partial(exit_hook, calls, index, site, multiplier)
                add_hook(surgery, getattr(layer, name), name, "post", hook)
    add_no_split(model, {type(layer).__name__ for layer in layers})
    model.hc_config = config
    model.config.hc_retrofit = config.to_dict()
    setattr(model.config, STRUCTURE_KEY, family.to_dict(model.config))  # saved checkpoints rebuild this structure
    return model


def remove_hyper_connections(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_family` in place and return ``model``: the original model object again.

    Every decoder layer gets its original class back, loses its ``hyper_connections`` and the hooks
    conversion registered (by their recorded handles, including hooks that followed a replaced
    child); the config loses the ``hc_retrofit`` keys, the model ``hc_config``, and
    ``_no_split_modules`` the names conversion added. Parameters and buffers of the original model
    are never touched (conversion only adds), so the result computes the original function. The
    HC parameters are discarded: this is peft's ``unload()``, not a merge (a trained HC model has no
    plain equivalent).
    """
    for module in model.modules():
        surgery = module.__dict__.get("_hc_surgery")
        if surgery is not None:
            undo_layer(module, surgery)
    remove_no_split(model)
    model.__dict__.pop("hc_config", None)
    config = getattr(model, "config", None)
    for key in (CONFIG_KEY, STRUCTURE_KEY):
        if config is not None and key in config.__dict__:
            delattr(config, key)
    return model
