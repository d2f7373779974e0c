"""Notice when a launcher asked for several processes but this run is alone (world size 1).

``accelerate launch --num_processes 2`` without ``--multi_gpu`` on a machine without GPUs starts one
ordinary process (accelerate's simple launcher) and says nothing; the user believes two processes
share the work. The launcher passes no process count to the child, so the count is read from
``ACCELERATE_NUM_PROCESSES`` if set, else from the launching ``accelerate launch`` command line
(``--num_processes N`` or the ``num_processes`` of its ``--config_file``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from hc_retrofit.log import get_logger

logger = get_logger(__name__)

_COUNT_FLAGS = ("--num_processes", "--num-processes")
_CONFIG_FLAGS = ("--config_file", "--config-file")


def parent_command_line() -> list[str] | None:
    """The launching process's argv (Linux ``/proc``), or ``None`` where it cannot be read."""
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return None
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _flag_value(argv: Sequence[str], names: tuple[str, ...]) -> str | None:
    for i, arg in enumerate(argv):
        for name in names:
            if arg == name and i + 1 < len(argv):
                return argv[i + 1]
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


def _is_accelerate_launch(argv: Sequence[str]) -> bool:
    if "accelerate.commands.launch" in argv[:3]:  # python -m accelerate.commands.launch
        return True
    names = [Path(a).name for a in argv[:4]]
    return "accelerate-launch" in names or ("accelerate" in names and "launch" in argv[: names.index("accelerate") + 2])


def requested_processes(environ: Mapping[str, str], launcher_argv: Sequence[str] | None) -> int | None:
    """How many processes the launcher was asked for, or ``None`` if that is not known."""
    value = environ.get("ACCELERATE_NUM_PROCESSES")
    if value is None and launcher_argv and _is_accelerate_launch(launcher_argv):
        value = _flag_value(launcher_argv, _COUNT_FLAGS)
        config = _flag_value(launcher_argv, _CONFIG_FLAGS)
        if value is None and config is not None:
            value = _config_processes(config)
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _config_processes(path: str) -> str | None:
    try:
        import yaml

        data = yaml.safe_load(Path(path).read_text())
    except Exception:  # an unreadable launch config is accelerate's to report, not ours
        return None
    value = data.get("num_processes") if isinstance(data, dict) else None
    return None if value is None else str(value)


def single_process_warning(
    world_size: int, environ: Mapping[str, str] | None = None, launcher_argv: Sequence[str] | None = None
) -> str | None:
    """The warning text when more processes were requested than this run has, else ``None``."""
    environ = os.environ if environ is None else environ
    wanted = requested_processes(environ, parent_command_line() if launcher_argv is None else launcher_argv)
    if wanted is None or wanted <= 1 or world_size >= wanted:
        return None
    return (
        f"the launcher asked for {wanted} processes but this run has {world_size} (WORLD_SIZE={world_size}), "
        "so it trains alone; without GPUs, start CPU processes with `accelerate launch --multi_gpu "
        f"--num_processes {wanted} ...` (or a config with distributed_type: MULTI_GPU and use_cpu: true; "
        "MULTI_CPU starts one process)"
    )


def warn_if_alone(world_size: int) -> None:
    """Log :func:`single_process_warning` (if any) on the package logger."""
    message = single_process_warning(world_size)
    if message:
        logger.warning(message)
