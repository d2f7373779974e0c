"""How many CPU threads a training process uses: never more than its share of the cores it may run on.

torch's default is one intra-op thread per core *per process*, so two processes on a 2-core
machine run four busy threads, and spinning threads that wait for each other (or for a core
another program holds) cost far more than they add on small matmuls. The budget here is the
cores this process may use (its CPU affinity, capped by a cgroup CPU quota, as in containers) that
are not already kept busy by other programs (sampled from ``/proc/stat`` for a fraction of a
second), divided by the processes of the run on this machine; the data is indexed in-process (no
data-loader workers), so that is the whole budget.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CPU_MAX = "/sys/fs/cgroup/cpu.max"  # cgroup v2: "<quota> <period>" or "max <period>"
CFS_QUOTA = "/sys/fs/cgroup/cpu/cpu.cfs_quota_us"  # cgroup v1: quota (-1: none) and period
CFS_PERIOD = "/sys/fs/cgroup/cpu/cpu.cfs_period_us"


def _cgroup_cpus(root: str = "") -> float | None:
    """The cgroup's CPU quota in cores (v2, then v1), or ``None`` when there is none (or it is unreadable)."""
    try:
        quota, period = Path(root + CPU_MAX).read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int(Path(root + CFS_QUOTA).read_text())
        period_us = int(Path(root + CFS_PERIOD).read_text())
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def available_cores(root: str = "") -> int:
    """Cores this process may run on: its affinity mask, capped by the cgroup quota (at least 1)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    quota = _cgroup_cpus(root)
    if quota is not None:
        cores = min(cores, max(1, math.floor(quota)))
    return max(1, cores)


def _cpu_times(stat: str = "/proc/stat") -> tuple[int, int] | None:
    """(idle, total) jiffies of all CPUs since boot, or ``None`` where ``/proc/stat`` cannot be read."""
    try:
        fields = Path(stat).read_text().split("\n", 1)[0].split()
        values = [int(v) for v in fields[1:]]
    except (OSError, ValueError, IndexError):
        return None
    if fields[0] != "cpu" or len(values) < 4:
        return None
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return idle, sum(values[:8])  # guest time is already counted in user


def idle_cores(interval: float = 0.2, stat: str = "/proc/stat") -> float | None:
    """How many cores stood idle during the next ``interval`` seconds (``None`` if unknown)."""
    import time

    before = _cpu_times(stat)
    if before is None:
        return None
    time.sleep(interval)
    after = _cpu_times(stat)
    if after is None or after[1] <= before[1]:
        return None
    share = (after[0] - before[0]) / (after[1] - before[1])
    return share * (os.cpu_count() or 1)


def local_processes() -> int:
    """Processes of this run on this machine (``LOCAL_WORLD_SIZE`` under torchrun / accelerate launch)."""
    for name in ("LOCAL_WORLD_SIZE", "WORLD_SIZE"):
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def default_threads(root: str = "", *, idle: float | None = -1.0) -> int:
    """Intra-op threads per process so that threads x local processes <= the cores free for this run.

    ``idle``: cores other programs leave free (default: :func:`idle_cores`, sampled now; ``None``:
    unknown, so all :func:`available_cores` count).
    """
    cores = available_cores(root)
    if idle is not None and idle < 0:
        idle = idle_cores()
    if idle is not None:
        cores = min(cores, max(1, round(idle)))
    return max(1, cores // local_processes())


def apply_threads(threads: int | None) -> int:
    """Set torch's intra-op threads to ``threads`` (``None``: leave the process's setting); return the count."""
    import torch

    if threads is not None and torch.get_num_threads() != int(threads):
        torch.set_num_threads(int(threads))
    return torch.get_num_threads()
