"""Notice when a launcher asked for several processes but this run is alone (world size 1).

``accelerate launch --num_processes 2`` without ``--multi_gpu`` on a machine without GPUs starts one
ordinary process (accelerate's simple launcher) and says nothing; the user believes two processes
share the work. What a launched process can see of its launcher is its environment (checked
against accelerate 1.16.0):

- torchrun, and accelerate's multi-GPU/FSDP launchers (which run it), export ``WORLD_SIZE``: the
  number of processes they started;
- the simple launcher exports ``ACCELERATE_DYNAMO_BACKEND`` (with the rest of its settings) to its
  one process, and ``MASTER_ADDR`` only when it was asked for more than one process or machine,
  but neither ``WORLD_SIZE`` nor the count itself. So such a run knows it was asked for several
  processes, not how many: no public signal carries the count (a ``MASTER_ADDR`` the user
  exported before ``accelerate launch`` passes through too, and reads the same);
- ``ACCELERATE_NUM_PROCESSES``, if a job script sets it (accelerate does not), gives the count.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from hc_retrofit.log import get_logger

logger = get_logger(__name__)


def requested_processes(environ: Mapping[str, str]) -> int | None:
    """How many processes the launcher was asked for, or ``None`` if it did not say."""
    for name in ("ACCELERATE_NUM_PROCESSES", "WORLD_SIZE"):
        value = environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return None


def simple_launcher_asked_for_several(environ: Mapping[str, str]) -> bool:
    """Whether accelerate's simple launcher started this one process after being asked for several."""
    launched = "ACCELERATE_DYNAMO_BACKEND" in environ and "WORLD_SIZE" not in environ
    return launched and "MASTER_ADDR" in environ


def single_process_warning(world_size: int, environ: Mapping[str, str] | None = None) -> str | None:
    """The warning text when more processes were requested than this run has, else ``None``."""
    environ = os.environ if environ is None else environ
    wanted = requested_processes(environ)
    if wanted is not None:
        if wanted <= 1 or world_size >= wanted:
            return None
        asked, count = f"{wanted} processes", str(wanted)
    elif world_size <= 1 and simple_launcher_asked_for_several(environ):
        asked, count = "several processes", "N"
    else:
        return None
    return (
        f"the launcher asked for {asked} but this run has {world_size}, so it trains alone; without GPUs, "
        f"start CPU processes with `accelerate launch --multi_gpu --num_processes {count} ...` (or a config "
        "with distributed_type: MULTI_GPU and use_cpu: true; MULTI_CPU starts one process)"
    )


def warn_if_alone(world_size: int) -> None:
    """Log :func:`single_process_warning` (if any) on the package logger."""
    message = single_process_warning(world_size)
    if message:
        logger.warning(message)
