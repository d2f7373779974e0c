"""The installed package's twins of a checkpoint's generated classes, made at run time.

A converted checkpoint names ``HCRetrofitConfig`` / ``HCRetrofit<Arch>`` from its copied modeling
files. :func:`load_converted <hc_retrofit.loading.load_converted>` builds the same two classes from the
installed hc-retrofit and transformers instead, so no checkpoint code runs.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from hc_retrofit.checkpoint_format import (
    BASE_ARCH_KEY,
    BASE_TYPE_KEY,
    MODEL_TYPE_PREFIX,
    read_config_dict,
    require_converted_dir,
)
from hc_retrofit.modeling.errors import CheckpointError
from hc_retrofit.modeling.remote_model import HCRetrofitModelMixin, register_conversions, retrofit_model_type


@functools.cache
def installed_classes(base_type: str, base_arch: str) -> tuple[type, type]:
    """``(config class, model class)`` for a base ``model_type`` and architecture, made once per pair."""
    import transformers
    from transformers import CONFIG_MAPPING

    try:
        base_config = CONFIG_MAPPING[base_type]
        base_model = getattr(transformers, base_arch)
    except (KeyError, AttributeError) as err:
        raise CheckpointError(
            f"this transformers ({transformers.__version__}) has no {base_arch} of type {base_type!r}; upgrade transformers"
        ) from err
    model_type = retrofit_model_type(base_type)
    config_cls = type("HCRetrofitConfig", (base_config,), {"model_type": model_type, "__module__": __name__})
    model_cls = type(
        f"HCRetrofit{base_arch}",
        (HCRetrofitModelMixin, base_model),
        {"config_class": config_cls, "__module__": __name__},
    )
    register_conversions(model_type, base_type, base_arch)
    return config_cls, model_cls


def converted_classes(path: str | os.PathLike) -> tuple[type, type]:
    """The installed classes for converted checkpoint directory ``path`` (refused if it is not one)."""
    require_converted_dir(path)
    data = read_config_dict(path)
    base_type = data.get(BASE_TYPE_KEY) or str(data.get("model_type", "")).removeprefix(MODEL_TYPE_PREFIX)
    base_arch = data.get(BASE_ARCH_KEY) or (data.get("architectures") or [""])[0].removeprefix("HCRetrofit")
    return installed_classes(base_type, base_arch)


def converted_config(path: str | os.PathLike) -> Any:
    """The config of converted checkpoint directory ``path``, as the installed config class."""
    return converted_classes(path)[0].from_pretrained(path)
