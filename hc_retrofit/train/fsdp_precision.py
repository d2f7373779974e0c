"""Under FSDP2 the hyper-connection parameters form one float32 unit of their own.

FSDP2 all-gathers each unit's parameters in its ``MixedPrecisionPolicy``'s ``param_dtype``. With
the HC sites inside their decoder layer's unit, a bf16 policy would hand the coefficients'
parameters (``a``, ``R``, ``b`` logits, dynamic projections) to forward rounded to bf16: the
coefficients are computed in float32, but from rounded inputs (mHC's sigmoid and Sinkhorn logits
lose three decimal digits). :func:`shard_hyper_connections` therefore shards every site of the
model, before the layers, as one unit with a float32 policy (its gradients are reduced in float32
too); the decoder layers' units then hold only the base model's parameters and keep the run's
policy.

The unit is gathered once per step: a forward pre-hook on the model unshards it (one all-gather
of a few kilobytes per site), it stays unsharded through forward and backward (the sites are used
by several calls per layer, in both passes), and FSDP reduce-scatters its gradients and reshards
it when backward ends, as it does for any unit whose forward inputs need no gradient.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hc_retrofit.modeling.patch import hyper_connection_sites
from hc_retrofit.train.errors import TrainingError
from hc_retrofit.train.strategy import is_fsdp

__all__ = ["hc_precision_policy", "shard_hyper_connections"]


def hc_precision_policy() -> Any:
    """The HC unit's ``MixedPrecisionPolicy``: parameters gathered in their own dtype (float32),
    gradients reduced in float32, the streams passed to the sites not cast."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32, cast_forward_inputs=False)


def _fsdp_mesh(accelerator: Any) -> Any:
    """The data-parallel mesh accelerate shards the rest of the model on (``None``: FSDP's default)."""
    mesh = getattr(accelerator, "torch_device_mesh", None)
    if mesh is None:
        return None
    return mesh[tuple(accelerator.parallelism_config.fsdp_dim_names)]


def shard_hyper_connections(accelerator: Any, model: nn.Module) -> int:
    """Shard ``model``'s HC sites as one float32 FSDP2 unit; return how many sites (0: not FSDP2 or no HC).

    Call it before building the optimiser (which then holds the sharded parameters) and before
    ``accelerator.prepare``, which shards the decoder layers around the sites.

    Raises:
        TrainingError: the FSDP settings load the weights on the main process only
            (``fsdp_cpu_ram_efficient_loading``), which the HC unit cannot be filled from.
    """
    if not is_fsdp(accelerator) or getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1) != 2:
        return 0
    sites = hyper_connection_sites(model)
    if not sites:
        return 0
    from torch.distributed.fsdp import OffloadPolicy, fully_shard

    plugin = accelerator.state.fsdp_plugin
    if plugin.cpu_ram_efficient_loading:
        raise TrainingError(
            "set fsdp_cpu_ram_efficient_loading: false in the accelerate config: hc-retrofit loads the model on "
            "every process, and its HC parameters are sharded before accelerate's broadcast from the main process"
        )
    unit = fully_shard(
        sites,
        mesh=_fsdp_mesh(accelerator),
        reshard_after_forward=False,
        mp_policy=hc_precision_policy(),
        offload_policy=plugin.cpu_offload or OffloadPolicy(),
    )
    model.register_forward_pre_hook(_Gather(unit[0]))
    return len(sites)


class _Gather:
    """The model's forward pre-hook: unshard the HC unit (a no-op while it is unsharded)."""

    def __init__(self, unit: nn.Module) -> None:
        self.unit = unit

    @torch.compiler.disable
    def __call__(self, module: nn.Module, args: tuple) -> None:
        self.unit.unshard()
