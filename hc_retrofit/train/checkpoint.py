"""Training checkpoints: ``OUT/checkpoints/step-00000100/`` written by accelerate's ``save_state``.

A checkpoint holds the model, optimiser, scheduler and RNG states (every process's), plus
``trainer_state.json`` with the step. It is written to a temporary directory and renamed only
when complete, so an interrupted save never becomes "the latest checkpoint"; the oldest ones
beyond ``keep`` are deleted only after the new one exists. Collective: call on every process.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

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


def save_checkpoint(accelerator: Any, out_dir: str | Path, step: int, state: dict[str, Any], *, keep: int) -> Path:
    """Save the accelerate state after ``step`` optimiser updates; keep the newest ``keep``."""
    final = checkpoint_path(out_dir, step)
    tmp = final.with_name(f".tmp-{final.name}")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
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
