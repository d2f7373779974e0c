"""The record of what conversion did to a model, so that removal undoes exactly that (peft's ``unload()``).

Per decoder layer a :class:`Surgery` keeps the original class and every hook conversion registered,
with its handle (:class:`SiteHook`); per module that has ``_no_split_modules``, the names
conversion added. Nothing here touches private torch hook dictionaries: removal uses the handles.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from torch.utils.hooks import RemovableHandle

_NO_SPLIT = "_hc_no_split_added"


@dataclass
class SiteHook:
    """One hook conversion registered on a child of a decoder layer, and its handle.

    ``child`` is the child's attribute name: a child replaced after conversion gets the hook again
    (see :meth:`~.converted_layer.HCDecoderLayerMixin.__setattr__`).
    """

    child: str
    kind: str  # "pre" (entry: feeds x) or "post" (exit: turns y into what the layer adds)
    fn: Callable[..., Any]
    handle: RemovableHandle | None = None

    def attach(self, module: nn.Module) -> None:
        """Register the hook on ``module`` (a forward pre-hook or forward hook, with kwargs)."""
        register = module.register_forward_pre_hook if self.kind == "pre" else module.register_forward_hook
        self.handle = register(self.fn, with_kwargs=True)

    def detach(self) -> None:
        """Remove the hook by its handle (nothing if it was never attached)."""
        if self.handle is not None:
            self.handle.remove()


@dataclass
class Surgery:
    """What conversion did to one decoder layer: its original class and the hooks it registered."""

    original_class: type
    hooks: list[SiteHook] = field(default_factory=list)


def add_hook(surgery: Surgery, module: nn.Module, child: str, kind: str, fn: Callable[..., Any]) -> None:
    """Register ``fn`` on ``module`` (the layer's child ``child``), recorded in ``surgery``."""
    hook = SiteHook(child, kind, fn)
    surgery.hooks.append(hook)  # recorded first, so that removal also undoes a failed registration
    hook.attach(module)


def add_no_split(model: nn.Module, names: set[str]) -> None:
    """Add the converted layers' class names to every ``_no_split_modules`` in ``model`` (an instance
    attribute, as transformers' ``post_init`` makes it), remembering what was added for removal."""
    for module in model.modules():
        current = module.__dict__.get("_no_split_modules")
        if current is None:
            continue
        added = names - set(current)
        if isinstance(current, list):
            module._no_split_modules = type(current)([*current, *sorted(added)])
        else:
            module._no_split_modules = {*current, *added}
        module.__dict__[_NO_SPLIT] = added


def remove_no_split(model: nn.Module) -> None:
    """Undo :func:`add_no_split`: drop the names it added from every ``_no_split_modules``."""
    for module in model.modules():
        added = module.__dict__.pop(_NO_SPLIT, None)
        if added:
            current = module._no_split_modules
            kept = [n for n in current if n not in added]
            module._no_split_modules = kept if isinstance(current, list) else set(kept)


def undo_layer(layer: nn.Module, surgery: Surgery) -> None:
    """Give ``layer`` its original class back, without the hooks, sites and ``_hc_*`` state conversion added."""
    for hook in surgery.hooks:
        hook.detach()
    if "hyper_connections" in dict(layer.named_children()):
        delattr(layer, "hyper_connections")
    for key in [k for k in layer.__dict__ if k.startswith("_hc_")]:
        del layer.__dict__[key]
    layer.__class__ = surgery.original_class
