"""`hc-retrofit train` under `accelerate launch` with FSDP on CPUs, for test_fsdp.py.

accelerate (1.15) refuses FSDP without a GPU: with ``use_cpu`` the state becomes MULTI_CPU (DDP on
gloo) and the FSDP plugin of the launch config is dropped; FSDP is only selected for GPU-like
distributed types. The shim below makes that one choice the other way: when the launcher asked
for FSDP (``ACCELERATE_USE_FSDP``) and accelerate chose MULTI_CPU, the state becomes FSDP with the
config's plugin, which is exactly what accelerate does for GPUs (state.py, the ``fsdp_plugin``
branch). Everything after it (``fully_shard`` in ``prepare``, gloo collectives, sharded
``save_state``, the gathered ``get_state_dict``) is accelerate's and hc-retrofit's code, unchanged.

Each process also writes ``$HC_PREPARED_RECORD.<rank>.json``: the distributed type and, per
parameter, whether it is a DTensor and how many of its elements this process holds.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import accelerate
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType
from torch.distributed.tensor import DTensor

_prepare = accelerate.Accelerator.prepare
_state_init = AcceleratorState.__init__


def _fsdp_on_cpu(self: AcceleratorState, *args: object, fsdp_plugin: object = None, **kwargs: object) -> None:
    _state_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    use_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if use_fsdp and fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as accelerate does at the end


def _recording_prepare(self: accelerate.Accelerator, *args: object, **kwargs: object) -> object:
    prepared = _prepare(self, *args, **kwargs)
    model = prepared[0] if isinstance(prepared, (tuple, list)) else prepared
    params = {
        name: {
            "dtensor": isinstance(p, DTensor),
            "local": (p.to_local() if isinstance(p, DTensor) else p).numel(),
            "full": p.numel(),
            "shape": list(p.shape),
        }
        for name, p in model.named_parameters()
    }
    record = {"distributed_type": str(self.distributed_type), "num_processes": self.num_processes, "params": params}
    Path(f"{os.environ['HC_PREPARED_RECORD']}.{self.process_index}.json").write_text(json.dumps(record))
    return prepared


AcceleratorState.__init__ = _fsdp_on_cpu
accelerate.Accelerator.prepare = _recording_prepare

if __name__ == "__main__":
    from hc_retrofit.cli.app import main

    main(sys.argv[1:])
