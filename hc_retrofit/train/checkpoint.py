"""Training checkpoints: ``OUT/checkpoints/step-00000100/`` written by accelerate's ``save_state``.

A checkpoint holds the model, optimiser, scheduler and RNG states (every process's), plus
``trainer_state.json`` with the step. It is written to a temporary directory and renamed only
when complete, so an interrupted save never becomes "the latest checkpoint"; the oldest ones
beyond ``keep`` are deleted only after the new one exists. Collective: call on every process.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hc_retrofit.private_api import removed_shared_tensors

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"


def checkpoint_path(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir) / CHECKPOINTS / f"step-{step:08d}"


def list_checkpoints(out_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run as (step, path), oldest first."""
    root = Path(out_dir) / CHECKPOINTS
    found = []
    for path in root.glob("step-*") if root.is_dir() else []:
        try:
            found.append((int(json.loads((path / STATE_FILE).read_text())["step"]), path))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # incomplete (no state file yet) or damaged: never "the latest checkpoint"
    return sorted(found)


def latest_checkpoint(out_dir: str | Path) -> tuple[int, Path] | None:
    """The newest complete checkpoint, or ``None``."""
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def read_state(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / STATE_FILE).read_text())


def tied_names(model: Any) -> set[str]:
    """Parameter names that are a second name of an earlier parameter (tied weights, e.g. ``lm_head.weight``).

    By object identity, not storage pointers, so it also holds for sharded (DTensor) parameters.
    """
    seen: set[int] = set()
    tied = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            tied.add(name)
        seen.add(id(param))
    return tied


class _KnownTiesFilter(logging.Filter):
    """Drop accelerate's per-save "Removed shared tensor {...}" notice when it names only known ties.

    ``save_state`` saves a tied weight once; ``load_state`` loads into the live model, where the tie
    still holds, so nothing is lost (resume is tested bit-exact). Any other name still gets through.
    """

    def __init__(self, names: set[str]) -> None:
        super().__init__()
        self.names = names

    def filter(self, record: logging.LogRecord) -> bool:
        removed = removed_shared_tensors(record.getMessage())
        return removed is None or not removed <= self.names


@contextlib.contextmanager
def _quiet_known_ties(models: list[Any]) -> Iterator[None]:
    names = set().union(*(tied_names(m) for m in models))
    accelerate_logger = logging.getLogger("accelerate.utils.other")
    notice = _KnownTiesFilter(names)
    accelerate_logger.addFilter(notice)
    try:
        yield
    finally:
        accelerate_logger.removeFilter(notice)


def save_checkpoint(
    accelerator: Any, out_dir: str | Path, step: int, state: dict[str, Any], *, keep: int, models: list[Any] = ()
) -> Path:
    """Save the accelerate state after ``step`` optimiser updates; keep the newest ``keep``.

    ``models``: the prepared models, whose known weight ties are not reported on every save.
    """
    final = checkpoint_path(out_dir, step)
    tmp = final.with_name(f".tmp-{final.name}")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    with _quiet_known_ties(list(models)):
        accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step}, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for _, old in list_checkpoints(out_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final
