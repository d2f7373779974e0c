"""Non-finite weights (NaN, inf) in a base model: a damaged checkpoint, said as such.

A base with a NaN weight computes NaN logits; the exactness proof and ``verify`` then fail, and
without this check their message would blame the model's structure or hc-retrofit. These
functions name the first tensor that holds a non-finite value, so the error says what is wrong.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from hc_retrofit.modeling.errors import CheckpointError


class NonFiniteWeightsError(CheckpointError):
    """A base model's weights hold NaN or inf: the checkpoint is damaged."""


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether a floating-point ``tensor`` holds no NaN and no inf.

    One reduction pass and no temporary: NaN propagates through ``aminmax`` and an inf is one of the
    extremes, so both extremes are finite exactly when every element is (``isfinite(t).all()``
    writes a boolean copy of the tensor first, about ten times slower on a CPU).
    """
    if tensor.numel() == 0:
        return True
    try:
        low, high = torch.aminmax(tensor.detach())
    except (RuntimeError, NotImplementedError):  # a dtype without aminmax on this device
        return bool(torch.isfinite(tensor).all())
    return bool(torch.isfinite(low) & torch.isfinite(high))


def first_nonfinite_tensor(model: Any) -> str | None:
    """The name of ``model``'s first floating-point parameter or buffer holding NaN or inf, or ``None``."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and tensor.device.type != "meta" and not all_finite(tensor):
            return name
    return None


def first_nonfinite_in_files(directory: str | os.PathLike) -> str | None:
    """The first tensor of the ``*.safetensors`` files in ``directory`` holding NaN or inf (one tensor at a time)."""
    from safetensors import safe_open

    for file in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                tensor = f.get_tensor(key)
                if tensor.is_floating_point() and not all_finite(tensor):
                    return f"{key} ({file.name})"
    return None


def refuse_nonfinite(name: str, tensor: str | None) -> None:
    """Raise the one-line error for base model ``name`` whose tensor ``tensor`` is not finite (if any)."""
    if tensor is not None:
        raise NonFiniteWeightsError(
            f"{name}: weight {tensor} holds NaN or inf values: the checkpoint is damaged (or its training "
            "diverged); nothing to convert. Use an intact copy"
        )
