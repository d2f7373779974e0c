"""What a comparison runs: the arms (plain + HC variants), the LR grid of each, the seeds.

A comparison answers "does HC pay on this model and data?" without measuring the learning rate
instead: every arm gets its own LR grid (HC arms also a grid of HC LR multipliers), the best
setting of each arm is chosen on the *validation* split, and reported on a separate *held-out*
split (the data is cut into [train | validation | held-out] blocks, see
:func:`hc_retrofit.train.data.split_blocks`). Each trial is one ordinary ``train`` run with its
own directory, so an interrupted comparison resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hc_retrofit.modeling.config import VARIANTS
from hc_retrofit.train.errors import TrainingError
from hc_retrofit.train.recipe import TrainConfig, merge

#: TrainConfig keys the comparison sets per trial; passing them as train settings is an error.
CONTROLLED = {
    "model": "MODEL",
    "data": "--data",
    "out": "--out",
    "no_hc": "(the plain arm)",
    "variant": "--variants",
    "streams": "--streams",
    "lr": "--lr-grid",
    "hc_lr_multiplier": "--hc-lr-multiplier-grid",
    "seed": "--seeds",
    "eval_fraction": "--validation-fraction",
    "heldout_fraction": "--heldout-fraction",
    "resume": "(automatic)",
    "overwrite": "--overwrite",
}
PLAIN = "plain"
#: train settings that only mean something with HC: they apply to the HC arms, the plain arm runs without them
HC_ONLY = ("hc_warmup_steps", "width_init_main", "residual_init_main")


@dataclass(frozen=True)
class Arm:
    """One side of the comparison: the plain model (``variant=None``) or one HC variant and width."""

    variant: str | None = None
    streams: int | None = None

    @property
    def name(self) -> str:
        return PLAIN if self.variant is None else f"{self.variant} n={self.streams}"

    @property
    def slug(self) -> str:
        return PLAIN if self.variant is None else f"{self.variant}-n{self.streams}"

    @property
    def hc(self) -> bool:
        return self.variant is not None


@dataclass(frozen=True)
class Trial:
    """One training run: an arm at one (LR, HC LR multiplier) setting and one seed."""

    arm: Arm
    lr: float
    hc_lr_multiplier: float | None
    seed: int

    @property
    def setting(self) -> tuple[float, float | None]:
        return (self.lr, self.hc_lr_multiplier)

    @property
    def relpath(self) -> str:
        mult = "" if self.hc_lr_multiplier is None else f"-x{self.hc_lr_multiplier:g}"
        return f"runs/{self.arm.slug}/lr{self.lr:g}{mult}/seed{self.seed}"


@dataclass
class CompareSpec:
    """Settings of one comparison (``hc-retrofit compare``).

    ``train`` holds every other :class:`~hc_retrofit.train.TrainConfig` setting (applied over the
    ``recipe`` file, if any), the same for every trial, except the HC-only ones (:data:`HC_ONLY`:
    HC-only warm-up, the HC init), which the plain arm runs without. ``tune_seeds``: the best setting of each
    arm is chosen on the mean validation loss of the first ``tune_seeds`` seeds (default: all);
    the remaining seeds run only that setting, which cuts the cost of a many-seed comparison.
    """

    model: str
    data: str
    out: str
    variants: tuple[str, ...] = ("mhc",)
    streams: tuple[int, ...] = (4,)
    seeds: tuple[int, ...] = (0,)
    lr_grid: tuple[float, ...] = (1e-4, 3e-4, 1e-3)
    hc_lr_multiplier_grid: tuple[float, ...] = (10.0,)
    tune_seeds: int | None = None
    validation_fraction: float = 0.05
    heldout_fraction: float = 0.05
    recipe: str | None = None
    train: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> CompareSpec:
        """Raise :class:`TrainingError` naming the first bad setting; return ``self``."""
        for name in ("variants", "streams", "seeds", "lr_grid", "hc_lr_multiplier_grid"):
            values = getattr(self, name)
            if not values:
                raise TrainingError(f"--{name.replace('_', '-')} is empty: give at least one value")
            if len(set(values)) != len(values):
                raise TrainingError(f"--{name.replace('_', '-')} repeats a value: {', '.join(map(str, values))}")
        bad = [v for v in self.variants if v not in VARIANTS]
        if bad:
            raise TrainingError(f"unknown variant(s) {', '.join(bad)}: choose from {', '.join(VARIANTS)}")
        if any(n < 2 for n in self.streams):
            raise TrainingError("--streams values must be >= 2 (n = 1 is the plain model, which is always compared)")
        if any(x <= 0 for x in (*self.lr_grid, *self.hc_lr_multiplier_grid)):
            raise TrainingError("learning rates and HC LR multipliers must be > 0")
        if self.tune_seeds is not None and not 1 <= self.tune_seeds <= len(self.seeds):
            raise TrainingError(f"--tune-seeds must be in [1, {len(self.seeds)}] (the number of seeds)")
        if self.validation_fraction <= 0 or self.heldout_fraction <= 0:
            raise TrainingError("--validation-fraction and --heldout-fraction must be > 0")
        taken = sorted(set(self.train) & set(CONTROLLED))
        if taken:
            raise TrainingError(
                f"{', '.join(taken)} is set by compare per run: use "
                + ", ".join(f"{CONTROLLED[k]} for {k}" for k in taken)
            )
        self.base_config()  # unknown keys, bad values
        for arm in self.arms:  # per-arm settings (the HC init is checked against each variant and n)
            lr, mult = self.settings(arm)[0]
            self.trial_config(Trial(arm, lr, mult, self.seeds[0]))
        return self

    @property
    def arms(self) -> list[Arm]:
        return [Arm()] + [Arm(v, n) for v in self.variants for n in self.streams]

    def settings(self, arm: Arm) -> list[tuple[float, float | None]]:
        """The (LR, HC LR multiplier) grid of ``arm`` (plain: LRs only)."""
        if not arm.hc:
            return [(lr, None) for lr in self.lr_grid]
        return [(lr, m) for lr in self.lr_grid for m in self.hc_lr_multiplier_grid]

    @property
    def tuning_seeds(self) -> tuple[int, ...]:
        return self.seeds[: self.tune_seeds or len(self.seeds)]

    def grid_trials(self) -> list[Trial]:
        """Every trial of the tuning seeds: each arm at each of its settings."""
        return [
            Trial(arm, lr, mult, seed)
            for seed in self.tuning_seeds
            for arm in self.arms
            for lr, mult in self.settings(arm)
        ]

    def base_config(self) -> TrainConfig:
        """The settings shared by every trial (recipe < ``train``), before the per-trial ones."""
        cfg = merge(self.recipe, **self.train)
        return dataclasses.replace(
            cfg,
            model=self.model,
            data=self.data,
            eval_fraction=self.validation_fraction,
            heldout_fraction=self.heldout_fraction,
        )

    def trial_config(self, trial: Trial, *, progress: bool | None = None) -> TrainConfig:
        """The full :class:`TrainConfig` of ``trial`` (its run dir under ``out``)."""
        cfg = self.base_config()
        values: dict[str, Any] = dict(
            out=str(Path(self.out) / trial.relpath), lr=trial.lr, seed=trial.seed, no_hc=not trial.arm.hc
        )
        if trial.arm.hc:
            values.update(variant=trial.arm.variant, streams=trial.arm.streams, hc_lr_multiplier=trial.hc_lr_multiplier)
        else:
            defaults = TrainConfig()
            values.update({name: getattr(defaults, name) for name in HC_ONLY})
        if progress is not None:
            values["progress"] = progress
        return dataclasses.replace(cfg, **values).validate()

    def fingerprint(self) -> dict[str, Any]:
        """What every trial shares; an existing comparison in ``out`` must match it to be resumed."""
        cfg = self.base_config().to_dict()
        bookkeeping = (
            "out",
            "progress",
            "report_to",
            "cache_dir",
            "resume",
            "overwrite",
            "save_every",
            "keep_checkpoints",
            "threads",  # how fast, not what: a comparison may resume with other threads
        )
        for key in bookkeeping:
            cfg.pop(key, None)
        return {"train": cfg}

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))
