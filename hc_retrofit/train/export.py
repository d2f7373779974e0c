"""Write the trained model to ``OUT/final``: one ordinary checkpoint, whatever the strategy was.

Under FSDP the parameters are shards on every process: the full state dict is gathered first
(collective) and loaded into an unsharded CPU copy of the model, which the main process saves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from hc_retrofit.loading import build_float32
from hc_retrofit.modeling.patch import hyper_connection_sites
from hc_retrofit.train.errors import TrainingError
from hc_retrofit.train.model import save_final
from hc_retrofit.train.strategy import is_fsdp


def save_trained(
    accelerator: Any, model: nn.Module, tokenizer: Any, final: Path, *, metadata: dict[str, Any], grad_ckpt: bool
) -> Path:
    """Write ``final`` (converted format, or ``save_pretrained`` for a plain model). Collective."""
    accelerator.wait_for_everyone()
    if is_fsdp(accelerator):
        state_dict = accelerator.get_state_dict(model)
        unwrapped = unsharded_copy(accelerator.unwrap_model(model), state_dict) if accelerator.is_main_process else None
    else:
        unwrapped = accelerator.unwrap_model(model)
    if accelerator.is_main_process:
        if grad_ckpt:
            getattr(unwrapped, "activation_checkpointing_disable", unwrapped.gradient_checkpointing_disable)()
        unwrapped.config.use_cache = True
        save_final(unwrapped, tokenizer, final, metadata=metadata)
    accelerator.wait_for_everyone()
    return final


def unsharded_copy(sharded: nn.Module, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """A CPU model with ``sharded``'s structure (incl. hyper-connections) holding ``state_dict``.

    A model converted on the fly has the plain class: its sites are rebuilt from the structure its
    config records (the one it was converted with, proven or discovered), never looked up anew.
    """
    from hc_retrofit.modeling.families import recorded_family
    from hc_retrofit.modeling.patch import apply_family

    model = build_float32(type(sharded), sharded.config)
    if hyper_connection_sites(sharded) and not hyper_connection_sites(model):
        family = recorded_family(sharded.config)
        if family is None:
            raise TrainingError("the trained model records no hyper-connection structure; cannot gather it to save")
        apply_family(model, sharded.hc_config, family=family)  # the structure proven at conversion
    model.load_state_dict(state_dict, strict=True)
    return model
