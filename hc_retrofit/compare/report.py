"""Turn finished trials into the answer: each arm at its best LR, gain over plain per seed, plots.

* **Selection** (:func:`best_settings`): per arm, the (LR, HC LR multiplier) with the lowest mean
  *validation* loss over the tuning seeds (a diverged trial counts as infinitely bad).
* **Report** (:func:`summarise`): per arm at that setting, the mean *held-out* loss over all seeds
  and the gain over plain, ``plain held-out - arm held-out`` per seed (positive = HC better),
  each arm and plain at their own best setting, so a gain is never an LR artefact.
* **Plots** (:func:`plot_compare`): mean held-out loss over seeds against training tokens and
  against training seconds, one line per arm at its best setting.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hc_retrofit.compare.outcomes import (
    COMPARE_FILE,
    PLOT_FILE,
    RESULTS_FILE,
    TrialOutcome,
    best_settings,
    is_finished,
    read_outcome,
)
from hc_retrofit.compare.spec import CompareSpec, Trial
from hc_retrofit.log import get_logger

logger = get_logger(__name__)


@dataclass
class ArmSummary:
    """One arm at its best setting, over all seeds."""

    arm: str
    lr: float
    hc_lr_multiplier: float | None
    validation_loss: float
    heldout_loss: float
    heldout_by_seed: dict[int, float]
    gain_by_seed: dict[int, float] | None
    gain_mean: float | None
    gain_std: float | None
    gain_min: float | None
    tokens_per_s: float
    train_seconds: float
    tokens: int


@dataclass
class CompareResult:
    """The comparison's answer (also ``OUT/results.json``)."""

    out_dir: str
    arms: list[ArmSummary]
    grid: list[dict[str, Any]] = field(default_factory=list)
    plot: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types; a non-finite loss (a diverged run) becomes ``None``."""
        return _finite(asdict(self))


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def summarise(spec: CompareSpec, outcomes: list[TrialOutcome]) -> CompareResult:
    """Select each arm's best setting and compute its held-out loss and gain over plain (see module doc)."""
    best = best_settings(spec, outcomes)
    chosen = {
        arm: {o.trial.seed: o for o in outcomes if o.trial.arm == arm and o.trial.setting == best[arm]}
        for arm in spec.arms
    }
    plain = chosen[spec.arms[0]]
    arms = []
    for arm in spec.arms:
        runs = chosen[arm]
        heldout = {seed: o.heldout_loss for seed, o in sorted(runs.items())}
        gains = None
        if arm.hc:
            gains = {s: plain[s].heldout_loss - v for s, v in heldout.items() if s in plain}
        gain_values = list(gains.values()) if gains else []
        arms.append(
            ArmSummary(
                arm=arm.name,
                lr=best[arm][0],
                hc_lr_multiplier=best[arm][1],
                validation_loss=statistics.fmean(o.validation_loss for o in runs.values()),
                heldout_loss=statistics.fmean(heldout.values()),
                heldout_by_seed=heldout,
                gain_by_seed=gains,
                gain_mean=statistics.fmean(gain_values) if gain_values else None,
                gain_std=statistics.stdev(gain_values) if len(gain_values) > 1 else (0.0 if gain_values else None),
                gain_min=min(gain_values) if gain_values else None,
                tokens_per_s=statistics.fmean(o.tokens_per_s for o in runs.values()),
                train_seconds=statistics.fmean(o.train_seconds for o in runs.values()),
                tokens=max(o.tokens for o in runs.values()),
            )
        )
    grid = []
    for arm in spec.arms:
        for setting in spec.settings(arm):
            trials = [o for o in outcomes if o.trial.arm == arm and o.trial.setting == setting]
            if not trials:
                continue
            grid.append(
                {
                    "arm": arm.name,
                    "lr": setting[0],
                    "hc_lr_multiplier": setting[1],
                    "seeds": sorted(o.trial.seed for o in trials),
                    "validation_loss": statistics.fmean(o.validation_loss for o in trials),
                    "heldout_loss": statistics.fmean(o.heldout_loss for o in trials),
                    "diverged": any(o.diverged for o in trials),
                    "chosen": setting == best[arm],
                }
            )
    return CompareResult(out_dir=spec.out, arms=arms, grid=grid)


def write_results(spec: CompareSpec, outcomes: list[TrialOutcome]) -> CompareResult:
    """:func:`summarise`, plot, and write ``results.json``; return the result."""
    result = summarise(spec, outcomes)
    best = best_settings(spec, outcomes)
    curves = {
        arm.name: [o for o in outcomes if o.trial.arm == arm and o.trial.setting == best[arm] and not o.diverged]
        for arm in spec.arms
    }
    result.plot = str(plot_compare(curves, Path(spec.out) / PLOT_FILE))
    (Path(spec.out) / RESULTS_FILE).write_text(json.dumps(result.to_dict(), indent=2))
    return result


def read_comparison(out: str | Path) -> tuple[CompareSpec, list[TrialOutcome]]:
    """The spec and finished trials of the comparison in ``out``, read from disk (nothing runs).

    For reports over several comparisons (``scripts/study_report.py``); ``out`` may have moved
    since it ran (the spec's ``out`` becomes ``out``). Unfinished trials are left out.
    """
    out = Path(out)
    marker = out / COMPARE_FILE
    if not marker.is_file():
        raise FileNotFoundError(f"{out} holds no comparison ({COMPARE_FILE})")
    values = json.loads(marker.read_text())["spec"]
    for name in ("variants", "streams", "seeds", "lr_grid", "hc_lr_multiplier_grid"):
        values[name] = tuple(values[name])
    spec = CompareSpec(**{**values, "out": str(out)})
    outcomes = [
        read_outcome(trial, out / trial.relpath)
        for arm in spec.arms
        for setting in spec.settings(arm)
        for seed in spec.seeds
        if is_finished(out / (trial := Trial(arm, *setting, seed)).relpath)
    ]
    return spec, outcomes


def mean_curve(runs: list[TrialOutcome]) -> list[tuple[int, float, float]]:
    """(tokens, mean training seconds, mean held-out loss) at the eval steps every run has, after step 0.

    Step 0 (the base model, the same for every arm) would dwarf the differences the plot is for.
    """
    by_step: dict[int, list[Any]] = {}
    for o in runs:
        for p in o.curve:
            if p.heldout_loss is not None:
                by_step.setdefault(p.step, []).append(p)
    return [
        (
            points[0].tokens,
            statistics.fmean(p.seconds for p in points),
            statistics.fmean(p.heldout_loss for p in points),
        )
        for step, points in sorted(by_step.items())
        if step > 0 and len(points) == len(runs)
    ]


def plot_compare(curves: dict[str, list[TrialOutcome]], out_png: Path) -> Path:
    """Held-out loss against tokens (left) and training seconds (right), one line per arm."""
    from hc_retrofit.plots import new_figure

    fig = new_figure(figsize=(11, 4.2), dpi=110)
    ax_tok, ax_sec = fig.subplots(1, 2, sharey=True)
    for i, (name, runs) in enumerate(curves.items()):
        points = mean_curve(runs)
        if not points:  # said, in the legend and as a warning, rather than an arm silently missing
            why = "no run" if not runs else f"no eval step after 0 shared by its {len(runs)} run(s)"
            logger.warning("%s: %s is not plotted (%s)", out_png.name, name, why)
            for ax in (ax_tok, ax_sec):
                ax.plot([], [], color=f"C{i}", lw=0, marker="x", label=f"{name}: not plotted ({why})")
            continue
        tokens, seconds, loss = zip(*points, strict=True)
        style = dict(color=f"C{i}", marker="o", ms=3, lw=1.6, label=f"{name} ({len(runs)} seed(s))")
        ax_tok.plot(tokens, loss, **style)
        ax_sec.plot(seconds, loss, **style)
    ax_tok.set_xlabel("training tokens")
    ax_sec.set_xlabel("training seconds (excl. eval)")
    ax_tok.set_ylabel("held-out loss (nats/token), mean over seeds")
    for ax in (ax_tok, ax_sec):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle("hc-retrofit compare: each arm at its best LR (chosen on validation)")
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png)
    return out_png
