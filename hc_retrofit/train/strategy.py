"""The accelerator of a run and the strategy it really uses: one process, DDP or FSDP2, on CPU or GPU.

``accelerate launch`` passes the strategy in the environment (``ACCELERATE_USE_FSDP``, the
``fsdp_config`` of its config file). On a GPU accelerate selects FSDP from it; without one,
accelerate (checked against 1.16) forms a gloo group as ``MULTI_CPU`` and silently drops the FSDP
plugin, so ``recipes/accelerate/fsdp_cpu.yaml`` would run DDP. :func:`make_accelerator` keeps
the launcher's choice: when FSDP was asked for and accelerate chose ``MULTI_CPU``, the state is
set to FSDP with the launcher's plugin, the choice accelerate makes for GPUs. Everything after it
(``fully_shard`` in ``prepare``, sharded ``save_state``, the gathered ``get_state_dict``) is
accelerate's own code. :func:`strategy_name` reports what ran, read from the prepared model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hc_retrofit.private_api import reset_accelerate_state
from hc_retrofit.train.errors import TrainingError
from hc_retrofit.train.model import resolve_dtype
from hc_retrofit.train.recipe import TrainConfig


def _fsdp_requested() -> bool:
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def make_accelerator(cfg: TrainConfig, out_dir: Path) -> Any:
    """An ``Accelerator`` for this run: CPU/gloo without a GPU, FSDP2 whenever the launcher asked for it."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, ProjectConfiguration

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if not distributed:  # in-process runs (demo, tests) may each want other settings
        reset_accelerate_state()
    # Without a GPU, `accelerate launch --multi_gpu` needs cpu=True to form a gloo group (else each
    # process runs alone and all of them act as the main process).
    cpu = cfg.cpu or (distributed and not torch.cuda.is_available())
    fsdp_plugin = FullyShardedDataParallelPlugin() if distributed and _fsdp_requested() else None
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=resolve_mixed_precision(cfg.mixed_precision, cpu=cpu),
        log_with=(cfg.report_to or None),
        project_config=ProjectConfiguration(project_dir=str(out_dir), logging_dir=str(out_dir / "logs")),
        step_scheduler_with_optimizer=False,  # our schedule counts optimiser steps, not process-steps
        fsdp_plugin=fsdp_plugin,
    )
    state = accelerator.state
    if fsdp_plugin is not None and state.distributed_type == DistributedType.MULTI_CPU:
        if state.mixed_precision != "no":
            fsdp_plugin.set_mixed_precision(state.mixed_precision)
        state.fsdp_plugin = fsdp_plugin
        state.distributed_type = DistributedType.FSDP
        PartialState().distributed_type = DistributedType.FSDP  # shared state, as accelerate sets it for GPUs
    _check_fsdp_dtype(cfg, accelerator)
    return accelerator


def resolve_mixed_precision(name: str, *, cpu: bool = False) -> str | None:
    """``auto``: the launcher's setting if any, else bf16 on a GPU that supports it, else none.

    ``fp16`` without a GPU is refused: accelerate would run in float32 without a word.
    """
    if name == "fp16" and (cpu or not torch.cuda.is_available()):
        raise TrainingError(
            "--mixed-precision fp16 needs a GPU (its loss scaling runs only there); on CPU pass bf16 or no"
        )
    if name != "auto":
        return name
    if os.environ.get("ACCELERATE_MIXED_PRECISION"):
        return None  # accelerate reads it from the environment (accelerate launch / config file)
    if not cpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def _check_fsdp_dtype(cfg: TrainConfig, accelerator: Any) -> None:
    """Under FSDP the shards are the optimiser's float32 master weights, base and HC alike.

    The FSDP mixed-precision policy (``mixed_precision: bf16``) still computes the layers in bf16,
    so nothing is lost; bf16 master weights would lose small updates (and a unit holds one dtype).
    The HC parameters have a float32 unit of their own (:mod:`hc_retrofit.train.fsdp_precision`).
    """
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP and resolve_dtype(cfg.model_dtype) != torch.float32:
        raise TrainingError(
            "under FSDP load the model in float32 (model_dtype: float32): the shards are the optimiser's master "
            "weights; FSDP's mixed precision (mixed_precision: bf16) still computes in bf16"
        )


def is_fsdp(accelerator: Any) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def strategy_name(accelerator: Any, model: nn.Module) -> str:
    """What this run really does, from the prepared model: ``fsdp2``, ``fsdp1``, ``ddp`` or ``single``."""
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in model.parameters()):
        return "fsdp2"
    if is_fsdp(accelerator):
        return "fsdp1"
    return "ddp" if accelerator.num_processes > 1 else "single"


def local_parameter_fraction(model: nn.Module) -> float:
    """The share of the model's parameter elements this process holds (1.0 unsharded, ~1/N under FSDP)."""
    local = full = 0
    for p in model.parameters():
        full += p.numel()
        local += (p.to_local() if hasattr(p, "to_local") else p).numel()
    return local / full if full else 1.0
