"""Turn a loaded base model into a converted checkpoint's model in place: one model in memory.

``verify`` (and the default ``convert``, which verifies what it wrote) compares a converted
checkpoint with its base on a probe batch (:mod:`hc_retrofit.equivalence`). Loading both models in float32 holds two models; but the
base is needed only for its reference outputs, and the converted model is the base plus the
surgery its config records plus the tensors of its files. So: load the base, run the probe, then
:func:`become_checkpoint` applies the recorded surgery to that same model object (as a loader's
``HCRetrofitModelMixin.__init__`` does) and copies every tensor of the written files into it (one
tensor read at a time), and the probe runs again. The outputs are those of the written files:
every parameter and persistent buffer comes from them.

When the checkpoint's config describes another model than the base's (e.g. a trained checkpoint
with another vocabulary), its weights are not safetensors, or its tensors are not exactly the
model's by name and shape (a checkpoint whose keys the loader converts, e.g. MoE experts, or a
damaged one), :class:`NotInPlace` says why, before anything changes, and the caller loads the
checkpoint with :func:`~hc_retrofit.loading.load_converted` instead (which refuses a damaged one).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hc_retrofit.checkpoint_format import (
    BASE_ARCH_KEY,
    BASE_KEY,
    BASE_TYPE_KEY,
    CODE_HASH_KEY,
    CONFIG_KEY,
    METADATA_KEY,
    STRUCTURE_KEY,
    VERSION_KEY,
    read_config_dict,
)
from hc_retrofit.layered import LayeredUnavailable, StoredTensor, stored_tensors
from hc_retrofit.modeling.config import HCConfig
from hc_retrofit.modeling.patch import apply_family, remove_hyper_connections
from hc_retrofit.runtime_classes import converted_config

# config.json keys that say how the checkpoint was written, not what the model computes
_WRITER_KEYS = frozenset(
    {
        CONFIG_KEY,
        STRUCTURE_KEY,
        BASE_KEY,
        BASE_TYPE_KEY,
        BASE_ARCH_KEY,
        VERSION_KEY,
        CODE_HASH_KEY,
        METADATA_KEY,
        "model_type",
        "architectures",
        "auto_map",
        "_name_or_path",
        "transformers_version",
        "dtype",
        "torch_dtype",
    }
)


class NotInPlace(Exception):
    """Why a checkpoint cannot be loaded into its base model in place (the caller loads it whole)."""


def become_checkpoint(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Make base ``model`` (float32) the converted checkpoint in ``directory``, in place, and return it.

    Raises :class:`NotInPlace` (``model`` unchanged) when the checkpoint's config differs from the
    model's in anything but the converted keys, or its tensors are not exactly the converted model's
    (names and shapes). The surgery is undone if copying fails.
    """
    directory = Path(directory)
    written = read_config_dict(directory)
    differs = _config_differences(converted_config(directory).to_dict(), model.config.to_dict())
    if differs:
        raise NotInPlace(f"its config differs from the base's ({', '.join(differs[:3])})")
    try:
        tensors = stored_tensors(directory)
    except LayeredUnavailable as why:
        raise NotInPlace(str(why)) from why
    if STRUCTURE_KEY in written:
        setattr(model.config, STRUCTURE_KEY, written[STRUCTURE_KEY])
    apply_family(model, HCConfig.from_dict(dict(written[CONFIG_KEY])))  # what the loader's mixin runs
    try:
        plan = _match_tensors(model, tensors)
    except NotInPlace:
        remove_hyper_connections(model)
        raise
    for key in (BASE_KEY, BASE_TYPE_KEY, BASE_ARCH_KEY):
        if key in written:
            setattr(model.config, key, written[key])
    _copy_tensors(model, plan, tensors)
    return model


def _config_differences(written: dict[str, Any], base: dict[str, Any]) -> list[str]:
    """The keys (not the converted ``hc_retrofit*`` keys nor :data:`_WRITER_KEYS`) whose values differ
    between two configs' full dicts."""
    keys = {k for k in set(written) | set(base) if not k.startswith(CONFIG_KEY)} - _WRITER_KEYS  # hc_retrofit*: ours
    return sorted(k for k in keys if written.get(k) != base.get(k))


def _match_tensors(model: nn.Module, tensors: dict[str, StoredTensor]) -> list[tuple[torch.Tensor, str]]:
    """``(model tensor, stored name)`` for every parameter and persistent buffer (a tied one once), or
    :class:`NotInPlace` unless the files hold exactly the model's tensors, by name and shape."""
    expected = model.state_dict(keep_vars=True)
    groups: dict[int, list[str]] = {}
    for name, tensor in expected.items():
        groups.setdefault(id(tensor), []).append(name)
    problems = [f"unexpected tensor {k}" for k in tensors if k not in expected]
    plan: list[tuple[torch.Tensor, str]] = []
    for names in groups.values():
        stored = next((n for n in names if n in tensors), None)
        target = expected[names[0]]
        if stored is None:
            problems.append(f"missing tensor {names[0]}")
        elif tuple(target.shape) != tensors[stored].shape:
            problems.append(f"tensor {stored} has shape {list(tensors[stored].shape)}, the model {list(target.shape)}")
        else:
            plan.append((target, stored))
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise NotInPlace(f"its tensors are not the model's: {'; '.join(problems[:3])}{more}")
    return plan


@torch.no_grad()
def _copy_tensors(model: nn.Module, plan: list[tuple[torch.Tensor, str]], tensors: dict[str, StoredTensor]) -> None:
    """Copy each stored tensor into its model tensor, then drop what the HC sites derived from the old values."""
    for target, stored in plan:
        tensors[stored].read_into(target)  # into the model's own memory: no second copy of each tensor
    for module in model.modules():  # caches derived from the replaced tensors (hc sites)
        clear = getattr(module, "clear_cache", None)
        if callable(clear):
            clear()
