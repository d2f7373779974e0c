"""`apply_family()`: retrofit hyper-connections into a loaded transformers model, in place, unchecked.

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
subclass of its own class), so transformers' gradient checkpointing, which wraps ``forward``,
recomputes it too. The layer talks to its sites only through the site API of
:mod:`hc_retrofit.site` (``width_connection``, ``advance``, ``mix``, ``outer``, ``delta``,
``depth_around``). Per-call state
(each site's context between its entry and exit) is filled and emptied by the layer's ``forward``
in a per-layer :class:`_LayerCalls`. What can be recomputed in backward is decided at convert time
from the block structure: the hot path has no autograd-graph inspection, ``try`` or hidden state,
so ``torch.compile`` traces a converted layer in one graph. Hooks are ``functools.partial`` objects
bound to their site and layer state, so ``copy.deepcopy`` of a converted model gives a model whose
hooks use the copy's own HC parameters.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .config import CONFIG_KEY, HCConfig
from .errors import AlreadyConvertedError, UnsupportedArchitectureError
from .families import STRUCTURE_KEY, Block, Family, family_for
from .site import HyperConnection, SiteContext
from .stream_ops import expand_streams, reduce_streams


class _LayerCalls:
    """The per-call state of one converted layer, shared with its hooks.

    The layer's ``forward`` fills it at the start of every call and empties it at the end (plain
    attribute stores, which ``torch.compile`` traces as ordinary side effects). ``contexts[s]``:
    site ``s`` between its entry and its exit (site 0 from the start). ``beside``: this call keeps
    the streams beside the layer (see :func:`_beside`); then ``streams`` holds the latest streams
    (the layer's input until the first exit),
    ``sites`` the layer's sites, and ``recompute`` says whether the second site recomputes its
    streams in backward (:func:`_recomputes`).
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
        sites: nn.ModuleList | None = None,
    ) -> None:
        self.beside, self.recompute, self.sites = beside, recompute, sites
        self.streams = None if first is None else first.streams
        self.contexts: list[SiteContext | None] = [first] + [None] * (self.num_sites - 1)


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


def _beside(layer: nn.Module) -> bool:
    """Whether this call keeps the streams beside the layer: each site's depth connection
    ``H' = R H + b (x) y`` computed in its exit hook (with the next site's width connection), the
    layer's own residual adds left to act on ``(B, T, D)`` tensors nobody reads.

    That is exact when the layer's output is its input plus the exits' outputs, added unchanged:
    decided at convert time from the structure (``_hc_recompute``: a sequential, sandwich or
    post-norm block, one exit per site, no residual multiplier; the proof checks the result).
    Dropout is the one thing that may sit between an exit and the add (phi3's
    ``resid_attn_dropout``, falcon's ``dropout_add``), so a training layer with any active dropout
    outside its branches lets the layer add the streams itself.
    """
    if not layer._hc_recompute:
        return False
    if not layer.training:
        return True
    config = layer._hc_config
    return not any(m.p > 0 for m in layer._hc_dropouts) and not any(
        getattr(config, k, 0) > 0 for k in layer._hc_dropout_keys
    )


def _recomputes(layer: nn.Module) -> bool:
    """Whether this (eager, autograd) call recomputes the second site's streams in backward
    (``H_1 = R_0 H_0 + b_0 (x) y_0``, from tensors saved anyway): when the streams are kept
    beside the layer (:func:`_beside`), with autograd and not under ``torch.compile``."""
    return torch.is_grad_enabled() and not torch.compiler.is_compiling() and _beside(layer)


class HCDecoderLayerMixin:
    """Mixed into each decoder layer's class by :func:`apply_family`; see the module docstring."""

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
        elif _beside(self):  # the hooks compute the streams; the layer's adds see (B, T, D) only
            calls = self._hc_calls
            calls.reset(ctx, beside=True, recompute=_recomputes(self), sites=self.hyper_connections)
            new_args, new_kwargs = _with_hidden(args, kwargs, x)
            out = super().forward(*new_args, **new_kwargs)
            new = calls.streams
            calls.reset()  # (an exception above leaves it filled until the next call resets it)
        else:  # the layer adds the streams: it receives R H, its exits return what it must add
            calls = self._hc_calls
            calls.reset(ctx)
            new_args, new_kwargs = _with_hidden(args, kwargs, first_site.mix(ctx))
            out = super().forward(*new_args, **new_kwargs)
            new = _first(out)
            calls.reset()
        if self._hc_last:
            new = reduce_streams(new)
        return _replace_first(out, new)

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
def _hc_layer_class(cls: type) -> type:
    """``cls`` with :class:`HCDecoderLayerMixin` in front, named ``HC<name>`` (one class per original class).

    The class is a global of this module under its own name, so ``type(layer)`` and ``repr`` say what
    the layer is and pickling finds it (see :meth:`HCDecoderLayerMixin.__reduce_ex__` for a new
    process). :func:`apply_family` adds the name to the model's ``_no_split_modules``, where accelerate's
    FSDP auto-wrap policy and transformers' ``device_map="auto"`` look for decoder layers by name.
    """
    name = f"HC{cls.__name__}"
    hc_cls = type(name, (HCDecoderLayerMixin, cls), {"__module__": __name__, "__qualname__": name})
    globals().setdefault(name, hc_cls)
    return hc_cls


def _rebuild_layer(original: type) -> nn.Module:
    """Unpickling half of :meth:`HCDecoderLayerMixin.__reduce_ex__`: an empty converted layer of ``original``."""
    return object.__new__(_hc_layer_class(original))


@dataclass
class _Hook:
    """One hook :func:`apply_family` registered on a child of a decoder layer, and its handle."""

    child: str
    kind: str  # "pre" (entry: feeds x) or "post" (exit: turns y into what the layer adds)
    fn: Callable[..., Any]
    handle: RemovableHandle | None = None

    def attach(self, module: nn.Module) -> None:
        register = module.register_forward_pre_hook if self.kind == "pre" else module.register_forward_hook
        self.handle = register(self.fn, with_kwargs=True)

    def detach(self) -> None:
        if self.handle is not None:
            self.handle.remove()


@dataclass
class _Surgery:
    """What :func:`apply_family` did to one decoder layer, so that :func:`remove_hyper_connections` undoes exactly that."""

    original_class: type
    hooks: list[_Hook] = field(default_factory=list)


def _entry_hook(
    calls: _LayerCalls, index: int, site: HyperConnection, module: nn.Module, args: tuple, kwargs: dict
) -> tuple[tuple, dict]:
    """Forward pre-hook on an entry module: feed it ``x = a . H`` instead of the streams."""
    ctx = calls.contexts[index]
    if ctx is None:  # first entry of a site whose x is not computed yet: read H_s here
        if calls.beside:
            _, ctx = site.width_connection(calls.streams)
        else:
            _, ctx = site.width_connection(_split_hidden(args, kwargs), adds_input=True)
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
    """Forward hook on an exit module: the branch output ``y`` updates the streams.

    Beside the layer: ``H' = R H + b (x) y`` (and the next site's ``x``) here, the output left as
    it is. Otherwise the output becomes what the layer must add: ``b (x) y`` on the site whose
    ``R H`` the layer received, ``(R - I) H + b (x) y`` on the others.
    """
    ctx = calls.contexts[index]
    y = _first(output)
    if calls.beside:
        following = calls.sites[index + 1] if index + 1 < calls.num_sites else None
        calls.streams, _, next_ctx = site.advance(ctx, y, following, recompute=calls.recompute and index == 0)
        if following is not None:
            calls.contexts[index + 1] = next_ctx
        return output
    if index == 0:  # the layer adds R H (its input) itself
        return _replace_first(output, site.outer(ctx, y))
    return _replace_first(output, site.delta(ctx, y, multiplier))  # the layer adds H + m * delta


def _recompute_allowed(block: Block, multiplier: float) -> bool:
    """Whether the block's structure lets the streams be kept beside the layer (:func:`_beside`):
    its output is its input plus each site's one exit output, added unchanged, site after site.

    True for sequential, sandwich and post-norm blocks with one exit per site and no residual
    multiplier; dropout between an exit and the add is checked per call.
    """
    return (
        block.kind in ("sequential", "sandwich", "post_norm")
        and all(len(site.exits) == 1 for site in block.sites)
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
    dropout_keys = _dropout_keys(model.config)
    site_index = 0
    for i, (layer, block) in enumerate(zip(layers, blocks, strict=True)):
        ref = next(layer.parameters())
        n_sites = max(1, len(block.sites))
        sites = nn.ModuleList(HyperConnection(dim, config, site_index + s) for s in range(n_sites))
        site_index += n_sites
        sites.to(device=ref.device)
        dropouts = _dropouts_outside_branches(layer, block)
        surgery = _Surgery(type(layer))
        layer.__class__ = _hc_layer_class(type(layer))
        layer._hc_surgery = surgery  # first, so that removal undoes a conversion that failed half-way
        layer.hyper_connections = sites
        layer._hc_block, layer._hc_multiplier = block, multiplier
        layer._hc_first, layer._hc_last = i == 0, i == len(layers) - 1
        layer._hc_calls = calls = _LayerCalls(n_sites)
        layer._hc_recompute = _recompute_allowed(block, multiplier)  # per layer: hybrid stacks mix blocks
        layer._hc_config, layer._hc_dropout_keys, layer._hc_dropouts = model.config, dropout_keys, dropouts
        for index, (site, spec) in enumerate(zip(sites, block.sites, strict=False)):
            for name in spec.entries:
                if isinstance(module := getattr(layer, name, None), nn.Module):
                    _add_hook(surgery, module, name, "pre", functools.partial(_entry_hook, calls, index, site))
            for name in spec.exits:
                hook = functools.partial(_exit_hook, calls, index, site, multiplier)
                _add_hook(surgery, getattr(layer, name), name, "post", hook)
    _record_no_split(model, {type(layer).__name__ for layer in layers})
    model.hc_config = config
    model.config.hc_retrofit = config.to_dict()
    setattr(model.config, STRUCTURE_KEY, family.to_dict(model.config))  # saved checkpoints rebuild this structure
    return model


def _add_hook(surgery: _Surgery, module: nn.Module, child: str, kind: str, fn: Callable[..., Any]) -> None:
    hook = _Hook(child, kind, fn)
    surgery.hooks.append(hook)  # recorded first, so that removal also undoes a failed registration
    hook.attach(module)


_NO_SPLIT = "_hc_no_split_added"


def _record_no_split(model: nn.Module, names: set[str]) -> None:
    """Add the converted layers' class names to every ``_no_split_modules`` in ``model`` (an instance
    attribute, as transformers' ``post_init`` makes it), remembering what was added for removal."""
    for module in model.modules():
        current = module.__dict__.get("_no_split_modules")
        if current is None:
            continue
        added = names - set(current)
        module._no_split_modules = (
            type(current)([*current, *sorted(added)])
            if isinstance(current, list)
            else {
                *current,
                *added,
            }
        )
        module.__dict__[_NO_SPLIT] = added


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
        if surgery is None:
            continue
        for hook in surgery.hooks:
            hook.detach()
        module._modules.pop("hyper_connections", None)
        for key in [k for k in module.__dict__ if k.startswith("_hc_")]:
            del module.__dict__[key]
        module.__class__ = surgery.original_class
    for module in model.modules():
        added = module.__dict__.pop(_NO_SPLIT, None)
        if added:
            current = module._no_split_modules
            kept = [n for n in current if n not in added]
            module._no_split_modules = kept if isinstance(current, list) else set(kept)
    model.__dict__.pop("hc_config", None)
    config = getattr(model, "config", None)
    for key in (CONFIG_KEY, STRUCTURE_KEY):
        if config is not None and key in config.__dict__:
            delattr(config, key)
    return model
