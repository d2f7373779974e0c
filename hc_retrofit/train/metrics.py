"""Metrics: ``metrics.jsonl`` (one JSON row per logged step), loss plots, trackers pass-through.

Rows: train rows have ``step`` and ``loss`` (plus ``lr``, ``hc_lr``, ``grad_norm``, ``tokens``,
``tokens_per_s``); eval rows have ``step``, ``eval_loss`` and ``eval_ppl`` (and ``heldout_loss`` with a ``heldout_fraction``). Row ``step = k``
describes the weights after ``k`` optimiser updates, so ``step 0`` is the converted model as
loaded: its loss is the base model's loss (the retrofit is exact).

Only the main process writes. On ``--resume`` the file is kept and rows at or after the resumed
step (written after that checkpoint by the interrupted run) are dropped, so the file holds one
clean curve.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl`` file (or of ``DIR/metrics.jsonl`` if given a directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsLog:
    """Appends rows to ``metrics.jsonl``; a no-op on processes other than the main one."""

    def __init__(self, path: str | Path, *, enabled: bool = True, resume_step: int | None = None) -> None:
        self.path = Path(path)
        self.enabled = enabled
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        else:
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) < resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")


def plot_losses(
    runs: dict[str, Iterable[dict[str, Any]]], out_png: str | Path, *, title: str = "hc-retrofit training"
) -> Path:
    """Plot train and eval loss of one or more runs to a PNG (see :func:`hc_retrofit.plots.plot_losses`)."""
    from hc_retrofit.plots import plot_losses as draw

    return draw(runs, out_png, title=title)
