"""The dtype names every command, recipe and Python entry point accepts."""

from __future__ import annotations

from typing import Any

import torch

from hc_retrofit.modeling.errors import ConfigError

DTYPES: dict[str, Any] = {
    "auto": "auto",
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
"""The dtype names every command and recipe accepts (``auto``: the checkpoint's own)."""
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
"""Short spellings, accepted wherever a :data:`DTYPES` name is."""


def parse_dtype(dtype: str | torch.dtype | None) -> str | torch.dtype:
    """A :data:`DTYPES` name (or alias) or a torch dtype -> a ``from_pretrained`` dtype."""
    if dtype is None:
        return "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    dtype = DTYPE_ALIASES.get(dtype, dtype)
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]
