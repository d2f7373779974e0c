"""Model classes that rebuild a converted checkpoint's structure when it is loaded.

A converted checkpoint's ``config.json`` has its own ``model_type`` (``hc_retrofit_<base type>``)
and an ``auto_map`` pointing at a small generated modeling file (see :mod:`hc_retrofit.remote_code`)
that subclasses the base family's config and ``*ForCausalLM`` with :class:`HCRetrofitModelMixin`.
The mixin's ``__init__`` runs :func:`convert` right after the base model is built (on the meta
device during ``from_pretrained``), so the checkpoint's HC tensors have somewhere to load into.

This module is copied beside the weights together with the package modules it imports, so it and
they may only import ``torch``, ``transformers`` and each other, relatively (``from .x import y``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from .config import BASE_TYPE_KEY, CONFIG_KEY, MODEL_TYPE_PREFIX, HCConfig
from .errors import CheckpointError, NotConvertedError
from .patch import apply_family

HC_MODULES = "hyper_connections"
"""The attribute name under which every converted layer keeps its sites (and so a fragment of the
name of every HC tensor)."""


def retrofit_model_type(base_model_type: str) -> str:
    """The ``model_type`` of a converted checkpoint of ``base_model_type`` (unknown to plain transformers)."""
    return MODEL_TYPE_PREFIX + base_model_type


def base_model_type(config: Any) -> str:
    """The original family's ``model_type`` of a (possibly converted) config."""
    recorded = getattr(config, BASE_TYPE_KEY, None)
    if recorded:
        return recorded
    return str(config.model_type).removeprefix(MODEL_TYPE_PREFIX)


class _BaseTypeView:
    """``config`` seen with the base family's ``model_type`` (for the family lookup in convert)."""

    def __init__(self, config: Any, model_type: str) -> None:
        object.__setattr__(self, "_config", config)
        object.__setattr__(self, "model_type", model_type)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._config, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._config, name, value)


@contextlib.contextmanager
def _base_type_config(model: Any) -> Iterator[None]:
    real = model.config
    model.config = _BaseTypeView(real, base_model_type(real))
    try:
        yield
    finally:
        model.config = real


def register_conversions(model_type: str, base_type: str, base_architecture: str | None = None) -> None:
    """Let ``model_type`` reuse the base family's checkpoint key conversions (fused MoE experts ...).

    transformers skips the conversions of custom-code classes unless they are registered, but
    the weights were saved by the base class, which applies them; without this, MoE checkpoints
    would not load.
    """
    try:
        from transformers import conversion_mapping as cm
    except ImportError:  # older transformers without key conversions
        return
    if model_type in getattr(cm, "USER_REGISTERED_MAPPINGS", ()):  # (transformers < 5.x keeps no such record)
        return
    # the base class's own mapping wins over its model_type's, as in transformers' lookup
    mapping = cm.get_checkpoint_conversion_mapping(base_architecture) if base_architecture else None
    if mapping is None:
        mapping = cm.get_checkpoint_conversion_mapping(base_type)
    if mapping is not None:
        cm.register_checkpoint_conversion_mapping(model_type, mapping, overwrite=True)


def check_load_report(info: dict[str, Any], path: Any, *, head_unused: bool = False) -> None:
    """Fail on missing/unexpected/mismatched keys: transformers leaves missing parameters uninitialised
    (and mismatched ones too, under ``ignore_mismatched_sizes=True``).

    ``head_unused``: a base model was loaded from a task model's checkpoint (``AutoModel`` on a
    causal LM), whose head tensors (``lm_head.weight``) it does not use; an unused HC tensor
    still fails.
    """
    info = dict(info)
    if head_unused:
        info["unexpected_keys"] = [k for k in info.get("unexpected_keys") or [] if HC_MODULES in str(k)]
    mismatched = sorted(k[0] if isinstance(k, (tuple, list)) else str(k) for k in info.get("mismatched_keys") or [])
    if mismatched:  # (reported, not raised, under ``ignore_mismatched_sizes=True``)
        more = " ..." if len(mismatched) > 5 else ""
        raise CheckpointError(
            f"{path}: tensor shapes disagree with config.json ({', '.join(mismatched[:5])}{more}); was it edited "
            "(e.g. num_streams)? Restore the config or convert again"
        )
    problems = {k: sorted(info.get(k) or []) for k in ("missing_keys", "unexpected_keys")}
    problems = {k: v for k, v in problems.items() if v}
    if problems:
        detail = "; ".join(
            f"{k.replace('_', ' ')}: {', '.join(map(str, v[:5]))}{' ...' if len(v) > 5 else ''}"
            for k, v in problems.items()
        )
        raise CheckpointError(f"{path} does not match the model it describes ({detail})")


class HCRetrofitModelMixin:
    """Put in front of a family's ``*ForCausalLM`` (or its base model): builds it, then retrofits it.

    Subclasses declare the HC tensors in ``_keep_in_fp32_modules_strict`` (merged with the base
    class's): transformers' ``from_pretrained`` and vLLM's Transformers backend then keep them in
    float32 under a float16/bfloat16 model.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        strict = list(getattr(cls, "_keep_in_fp32_modules_strict", None) or [])
        if HC_MODULES not in strict:
            cls._keep_in_fp32_modules_strict = [*strict, HC_MODULES]

    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        settings = getattr(config, CONFIG_KEY, None)
        if not settings:
            raise NotConvertedError(
                f"config has no {CONFIG_KEY!r} settings: this is not a converted hc-retrofit checkpoint"
            )
        with _base_type_config(self):
            apply_family(self, HCConfig.from_dict(dict(settings)))

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        """``from_pretrained`` that fails on any missing or unexpected tensor.

        transformers only warns and leaves a missing parameter uninitialised; for a converted
        checkpoint that would be a silently wrong model (e.g. an HC tensor deleted from the shard).
        """
        wants_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        path = args[0] if args else kwargs.get("pretrained_model_name_or_path", "the checkpoint")
        check_load_report(info, path, head_unused=getattr(model, "base_model", None) is model)
        return (model, info) if wants_info else model
