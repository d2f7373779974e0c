"""A comparison's directory and its finished trials: file names, outcomes, the best setting per arm.

Shared by :mod:`hc_retrofit.compare.runner` (which writes trials) and
:mod:`hc_retrofit.compare.report` (which reads them), so that neither imports the other.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hc_retrofit.compare.spec import Arm, CompareSpec, Trial
from hc_retrofit.train.errors import TrainingError
from hc_retrofit.train.metrics import read_metrics

COMPARE_FILE = "compare.json"
RESULTS_FILE = "results.json"
PLOT_FILE = "compare.png"
DIVERGED_FILE = "diverged.json"
SUMMARY_FILE = "summary.json"
#: held (with the process id) while a comparison runs: two at once would train the same run dirs
LOCK_FILE = "compare.lock"
#: what ``--overwrite`` may delete: only files a comparison writes
OWNED = (COMPARE_FILE, "runs", RESULTS_FILE, PLOT_FILE)
#: what a comparison writes (its run dirs carry manifests of their own)
COMPARE_CLAIMS = ("runs/*/*/*",)


@dataclass
class CurvePoint:
    """One eval of a run: after ``step`` updates, ``tokens`` trained in ``seconds`` of training."""

    step: int
    tokens: int
    seconds: float
    validation_loss: float | None
    heldout_loss: float | None


@dataclass
class TrialOutcome:
    """A finished trial: its final validation / held-out losses, speed and eval curve."""

    trial: Trial
    out_dir: str
    validation_loss: float
    heldout_loss: float
    tokens: int = 0
    train_seconds: float = 0.0
    diverged: str | None = None
    curve: list[CurvePoint] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.train_seconds if self.train_seconds else 0.0


def is_finished(run_dir: Path) -> bool:
    return (run_dir / SUMMARY_FILE).exists() or (run_dir / DIVERGED_FILE).exists()


def read_outcome(trial: Trial, run_dir: Path) -> TrialOutcome:
    """A finished trial's outcome from its run dir (``summary.json``/``diverged.json``, ``metrics.jsonl``)."""
    rows = read_metrics(run_dir)
    curve, seconds, tokens = _curve(rows)
    if (run_dir / DIVERGED_FILE).exists():
        error = json.loads((run_dir / DIVERGED_FILE).read_text())["error"]
        return TrialOutcome(trial, str(run_dir), math.inf, math.inf, tokens, seconds, diverged=error, curve=curve)
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    validation, heldout = summary.get("final_eval_loss"), summary.get("final_heldout_loss")
    if validation is None or heldout is None:
        raise TrainingError(f"{run_dir} has no validation/held-out loss: was it written by another version?")
    return TrialOutcome(trial, str(run_dir), validation, heldout, tokens, seconds, curve=curve)


def _curve(rows: list[dict[str, Any]]) -> tuple[list[CurvePoint], float, int]:
    """Eval points with the training time and tokens before them; total (seconds, tokens).

    Training time is summed from the train rows (``tokens / tokens_per_s`` is that step's time;
    a step that was not logged counts as the last logged one), so it excludes eval and start-up,
    and a resumed run counts each step once.
    """
    train = sorted((r for r in rows if r.get("loss") is not None and r.get("tokens_per_s")), key=lambda r: r["step"])
    per_step_tokens = train[0]["tokens"] // (train[0]["step"] + 1) if train else 0
    elapsed: dict[int, float] = {0: 0.0}  # step k -> training seconds of the first k updates
    total, prev = 0.0, -1
    for r in train:
        dt = per_step_tokens / r["tokens_per_s"]
        total += dt * (r["step"] - prev)
        prev = r["step"]
        elapsed[r["step"] + 1] = total
    known = sorted(elapsed)
    points = []
    for r in rows:
        if r.get("eval_loss") is None:
            continue
        step = r["step"]
        at = max((k for k in known if k <= step), default=0)
        points.append(CurvePoint(step, step * per_step_tokens, elapsed[at], r["eval_loss"], r.get("heldout_loss")))
    return points, total, (prev + 1) * per_step_tokens


def best_settings(spec: CompareSpec, outcomes: list[TrialOutcome]) -> dict[Arm, tuple[float, float | None]]:
    """Each arm's setting with the lowest mean validation loss over the tuning seeds."""
    best: dict[Arm, tuple[float, float | None]] = {}
    for arm in spec.arms:
        scores = {
            setting: _mean_validation(outcomes, arm, setting, spec.tuning_seeds) for setting in spec.settings(arm)
        }
        best[arm] = min(scores, key=lambda s: (scores[s], s[0]))  # ties: the lower LR
    return best


def _mean_validation(
    outcomes: list[TrialOutcome], arm: Arm, setting: tuple[float, float | None], seeds: tuple[int, ...]
) -> float:
    values = [
        o.validation_loss
        for o in outcomes
        if o.trial.arm == arm and o.trial.setting == setting and o.trial.seed in seeds
    ]
    return statistics.fmean(values) if values else math.inf
