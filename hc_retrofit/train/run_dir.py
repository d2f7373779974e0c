"""A training run's directory, from the check before anything is loaded to the summary at the end.

The rules come from :mod:`hc_retrofit.outputs` (never delete what we did not write): an existing
run is continued only with ``--resume`` and replaced only with ``--overwrite``; an overwritten
run is set aside, not deleted, and removed only once the new run is complete; a run that fails
before writing anything leaves no trace; a failed ``--overwrite`` puts the old run back unless
the new one has a checkpoint worth resuming. ``--resume`` never restarts or shortens a run.

Every file a run writes is recorded in the directory's manifest (:mod:`hc_retrofit.ownership`)
as soon as it is written, and the directory is locked while a process trains in it (:meth:`locked`).

Layout: ``metrics.jsonl``, ``loss.png``, ``summary.json``, ``checkpoints/step-N/``, ``final/``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from hc_retrofit import outputs, ownership
from hc_retrofit.train import checkpoint as ckpt
from hc_retrofit.train.errors import TrainingError
from hc_retrofit.train.metrics import METRICS_FILE
from hc_retrofit.train.recipe import TrainConfig

FINAL_DIR = "final"
PLOT_FILE = "loss.png"
SUMMARY_FILE = "summary.json"
LOGS_DIR = "logs"
"""What ``--report-to`` trackers write (accelerate's ``logging_dir``)."""
RUN_CLAIMS = (FINAL_DIR, f"{ckpt.CHECKPOINTS}/step-*")
"""What a run writes beside its files (the manifest vouches for their staging and lock files too)."""


class RunDirectory:
    """The ``--out`` of one run. Collective: every process builds one; only the main process writes."""

    def __init__(self, cfg: TrainConfig, accelerator: Any) -> None:
        self.cfg = cfg
        self.path = Path(cfg.out).expanduser().resolve()
        self.accelerator = accelerator
        self.main = accelerator.is_main_process
        self._existed = self.path.exists()
        self._aside: Path | None = None

    final = property(lambda self: self.path / FINAL_DIR)
    plot = property(lambda self: self.path / PLOT_FILE)
    metrics = property(lambda self: self.path / METRICS_FILE)
    summary = property(lambda self: self.path / SUMMARY_FILE)

    def locked(self) -> contextlib.AbstractContextManager[Any]:
        """The directory's lock (held by the main process): a second writer of this run is refused."""
        return ownership.output_lock(self.path) if self.main else contextlib.nullcontext()

    def open(self) -> None:
        """Check the directory (before anything is loaded), set an overwritten run aside, mark it ours."""
        out, cfg = self.path, self.cfg
        if _has_entries(out) and not (cfg.resume or cfg.overwrite):
            raise TrainingError(f"{out} exists and is not empty: pass --resume to continue that run or --overwrite")
        outputs.check_output_dir(out, overwrite=cfg.overwrite, resume=cfg.resume, inputs=[cfg.model, cfg.data])
        if cfg.resume:
            self.check_resumable()
        replace = cfg.overwrite and _has_entries(out)
        self.accelerator.wait_for_everyone()
        if self.main:
            if replace:
                outputs.clean_leftovers(out)
                self._aside = outputs.set_aside(out)
            ownership.adopt_dir(out, "run")
            ownership.claim(out, RUN_CLAIMS)
        self.accelerator.wait_for_everyone()

    def record(self, *names: str) -> None:
        """Add what the main process just wrote (and the appended metrics log) to the manifest."""
        if self.main:
            ownership.record(self.path, [n for n in names if (self.path / n).exists()], append=[METRICS_FILE])

    def completed_steps(self) -> int | None:
        """Steps of the finished run here (its ``summary.json``), or ``None``."""
        try:
            return int(json.loads(self.summary.read_text())["steps"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def check_resumable(self) -> None:
        """Refuse ``--resume`` when there is nothing to continue, or continuing would shorten the run."""
        out, max_steps = self.path, self.cfg.max_steps
        if not out.is_dir() or not any(p.name != outputs.MARKER for p in out.iterdir()):
            return  # nothing there yet: a fresh start loses nothing
        done, found = self.completed_steps(), ckpt.latest_checkpoint(out)
        if done is not None and done >= max_steps:
            raise TrainingError(
                f"the run in {out} is complete ({done} steps): nothing to resume; pass a larger --max-steps to "
                "train on from its last checkpoint, or choose a new --out"
            )
        if found is None:
            if done is not None:
                raise TrainingError(
                    f"the run in {out} is complete ({done} steps) but kept no checkpoint to continue from; "
                    "start a new run in another --out"
                )
            raise TrainingError(
                f"nothing to resume in {out}: it has no complete checkpoint; pass --overwrite to start over"
            )
        step, path = found
        if step >= max_steps:
            raise TrainingError(
                f"the newest checkpoint {path} is at step {step}, not below --max-steps {max_steps}: resuming "
                f"would save later weights as a shorter run; pass --max-steps > {step}"
            )

    def write_summary(self, summary: dict[str, Any]) -> None:
        """Write ``summary.json`` and record the finished run's files."""
        if self.main:
            self.summary.write_text(json.dumps(summary, indent=2))
            self.record(SUMMARY_FILE, FINAL_DIR, ckpt.CHECKPOINTS, PLOT_FILE, LOGS_DIR)

    def succeeded(self) -> None:
        """The new run is complete: now the run it replaced may go."""
        if self._aside is not None and self.main:
            shutil.rmtree(self._aside, ignore_errors=True)

    def failed(self) -> None:
        """Leave the directory as the rules above say after a run that raised."""
        if not self.main:
            return
        out = self.path
        if self._aside is not None:
            if ckpt.latest_checkpoint(out) is None:
                shutil.rmtree(out, ignore_errors=True)  # ours, just created, nothing worth keeping
                os.rename(self._aside, out)
                self.accelerator.print(f"the run failed; the previous contents of {out} are back in place")
            else:
                self.accelerator.print(
                    f"the run failed; its checkpoints are in {out}, the run it replaced is kept in {self._aside}"
                )
        elif out.is_dir() and [p.name for p in out.iterdir()] == [outputs.MARKER]:
            (out / outputs.MARKER).unlink()  # it wrote nothing worth reading or resuming
            if not self._existed:
                out.rmdir()


def _has_entries(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())
