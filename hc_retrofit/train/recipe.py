"""`TrainConfig`: every continued-pretraining setting, and YAML recipes that set them.

One flat dataclass so that a YAML recipe, the CLI flags and the Python API all speak the same
keys (``max_steps``, ``hc_lr_multiplier``, ...). Precedence: dataclass defaults < recipe file <
explicit flags (:func:`merge`). Unknown recipe keys are an error, because a typo in a recipe
would otherwise silently train with a default.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hc_retrofit.modeling.config import HCConfig
from hc_retrofit.modeling.errors import ConfigError
from hc_retrofit.train.compile import COMPILE_BACKENDS
from hc_retrofit.train.errors import TrainingError

#: Learning-rate multiplier of the HC parameters relative to ``lr``. Measured with ``compare`` (README
#: "The study": stories260K on tinyshakespeare, 400 steps, mHC n=4, base LR grid 3e-4..1e-2): at the
#: best base LR (1e-3) x10 beat x30 and x100 on validation and held-out loss, and x100 (x30) became
#: unstable or diverged at higher base LRs. 10 stays the default.
DEFAULT_HC_LR_MULTIPLIER = 10.0

MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
TRACKERS = ("tensorboard", "wandb", "all")


@dataclass
class TrainConfig:
    """Settings of one ``hc-retrofit train`` run.

    Tokens per optimiser step = ``batch_size * block_size * grad_accum * num_processes``
    (``batch_size`` is per process).
    """

    # what to train on, where to write
    model: str | None = None
    data: str | None = None
    out: str | None = None
    # the model: a converted dir is used as is; a plain model is converted with these settings
    streams: int = 4
    variant: str = "mhc"
    no_hc: bool = False
    revision: str | None = None
    trust_remote_code: bool = False
    model_dtype: str = "float32"
    # data
    text_column: str = "text"
    dataset_config: str | None = None
    dataset_split: str = "train"
    block_size: int = 256
    eval_fraction: float = 0.05
    heldout_fraction: float = 0.0
    eval_batches: int | None = 50
    cache_dir: str | None = None
    # optimisation
    max_steps: int = 1000
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    max_grad_norm: float = 1.0
    hc_lr_multiplier: float = DEFAULT_HC_LR_MULTIPLIER
    hc_warmup_steps: int = 0
    # the HC init when converting a plain model (None: HCConfig's default); exact at init for any valid value
    width_init_main: float | None = None
    residual_init_main: float | None = None
    grad_checkpointing: bool = False
    # regional compilation: every decoder layer torch.compile'd (see hc_retrofit.train.compile)
    compile: bool = False
    compile_backend: str = "inductor"
    mixed_precision: str = "auto"
    seed: int = 0
    # bookkeeping
    save_every: int = 200
    keep_checkpoints: int = 2
    eval_every: int = 100
    log_every: int = 1
    resume: bool = False
    overwrite: bool = False
    report_to: list[str] = field(default_factory=list)
    progress: bool = True
    cpu: bool = False
    threads: int | None = None
    """torch intra-op threads per process; ``None``: as the process has them (the CLI's default: its share
    of the cores, :func:`hc_retrofit.train.threads.default_threads`)."""

    def validate(self) -> TrainConfig:
        """Raise :class:`TrainingError` naming the first bad setting; return ``self``."""
        for name in ("data", "out"):
            if not getattr(self, name):
                raise TrainingError(f"no {name} given: pass --{name} (or set `{name}:` in the recipe)")
        if self.threads is not None and int(self.threads) < 1:
            raise TrainingError(f"threads must be >= 1, got {self.threads}")
        positive = ("max_steps", "batch_size", "grad_accum", "block_size", "log_every", "keep_checkpoints")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise TrainingError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("save_every", "eval_every", "warmup_steps", "hc_warmup_steps"):
            if int(getattr(self, name)) < 0:
                raise TrainingError(f"{name} must be >= 0 (0 disables), got {getattr(self, name)}")
        if not (0.0 <= self.eval_fraction < 1.0):
            raise TrainingError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if not (0.0 <= self.heldout_fraction < 1.0 - self.eval_fraction):
            raise TrainingError(f"heldout_fraction must be in [0, 1 - eval_fraction), got {self.heldout_fraction}")
        if self.heldout_fraction and not self.eval_fraction:
            raise TrainingError("heldout_fraction is evaluated with the eval split: set eval_fraction > 0 too")
        for name in ("lr", "hc_lr_multiplier", "min_lr_ratio", "weight_decay", "beta1", "beta2", "max_grad_norm"):
            if not math.isfinite(float(getattr(self, name))):
                raise TrainingError(f"{name} must be a finite number, got {getattr(self, name)}")
        if not (0 < self.lr <= 1):
            raise TrainingError(f"lr must be in (0, 1], got {self.lr} (typical: 1e-5 to 1e-3)")
        if not (0 < self.hc_lr_multiplier <= 1e4):
            raise TrainingError(f"hc_lr_multiplier must be in (0, 10000], got {self.hc_lr_multiplier} (default 10)")
        if self.lr * self.hc_lr_multiplier > 10:
            raise TrainingError(
                f"the HC learning rate lr x hc_lr_multiplier = {self.lr * self.hc_lr_multiplier:g} is far too high; "
                "lower --lr or --hc-lr-multiplier"
            )
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise TrainingError("weight_decay and max_grad_norm must be >= 0")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise TrainingError(f"beta1 and beta2 must be in [0, 1), got {self.beta1}, {self.beta2}")
        if not (0.0 <= self.min_lr_ratio <= 1.0):
            raise TrainingError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.compile_backend not in COMPILE_BACKENDS:
            raise TrainingError(
                f"unknown compile_backend {self.compile_backend!r}: choose one of {', '.join(COMPILE_BACKENDS)}"
            )
        if self.mixed_precision not in MIXED_PRECISION:
            raise TrainingError(
                f"unknown mixed_precision {self.mixed_precision!r}: choose one of {', '.join(MIXED_PRECISION)}"
            )
        bad = [t for t in self.report_to if t not in TRACKERS]
        if bad:
            raise TrainingError(f"unknown tracker(s) {', '.join(bad)} in report_to: choose from {', '.join(TRACKERS)}")
        if self.no_hc and self.hc_warmup_steps:
            raise TrainingError("--hc-warmup-steps trains only HC parameters; it makes no sense with --no-hc")
        init = self.hc_init()
        if self.no_hc and init:
            raise TrainingError(f"{', '.join(init)} set the HC init; they make no sense with --no-hc")
        if not self.no_hc:
            self.hc_config()  # the rules of HCConfig, so convert and train accept the same settings
        if self.resume and self.overwrite:
            raise TrainingError("--resume continues the run in --out; --overwrite would delete it: pick one")
        return self

    def hc_init(self) -> dict[str, float]:
        """The HC init settings given (``width_init_main``, ``residual_init_main``), as HCConfig keywords."""
        names = ("width_init_main", "residual_init_main")
        return {n: float(getattr(self, n)) for n in names if getattr(self, n) is not None}

    def hc_config(self) -> HCConfig:
        """The hyper-connection settings a plain model is converted with (``streams``, ``variant``, HC init)."""
        try:
            return HCConfig(num_streams=self.streams, variant=self.variant, **self.hc_init())
        except ConfigError as err:
            raise TrainingError(str(err)) from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_TYPES = {f.name: f.type for f in dataclasses.fields(TrainConfig)}


def _coerce(name: str, value: Any) -> Any:
    """YAML reads ``3e-4`` as a string (YAML 1.1 wants ``3.0e-4``): convert by the field's type."""
    kind = _TYPES[name]
    if value is None:
        return None
    try:
        if kind.startswith("float"):
            return float(value)
        if kind.startswith("int"):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if kind.startswith("str") and not isinstance(value, str):
            raise ValueError
        if kind.startswith("list") and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise ValueError
        if kind == "bool":
            if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
                return value.lower() in ("true", "yes", "1")
            if not isinstance(value, bool):
                raise ValueError
    except (TypeError, ValueError) as err:
        raise TrainingError(f"{name} must be of type {kind}, got {value!r}") from err
    return value


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Read a YAML recipe into a dict of :class:`TrainConfig` keys (``-`` or ``_`` accepted)."""
    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"recipe {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise TrainingError(f"recipe {path} is not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise TrainingError(f"recipe {path} must be a mapping of settings, got {type(raw).__name__}")
    values = {str(k).replace("-", "_"): v for k, v in raw.items()}
    unknown = sorted(set(values) - set(field_names()))
    if unknown:
        raise TrainingError(
            f"unknown key(s) {', '.join(unknown)} in recipe {path}; known keys: {', '.join(field_names())}"
        )
    if isinstance(values.get("report_to"), str):
        values["report_to"] = [values["report_to"]]
    return values


def merge(recipe: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """Defaults, then the recipe file (if any), then every override that is not ``None``."""
    values: dict[str, Any] = load_recipe(recipe) if recipe else {}
    unknown = sorted(set(overrides) - set(field_names()))
    if unknown:
        raise TrainingError(f"unknown setting(s) {', '.join(unknown)}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    values = {k: _coerce(k, v) for k, v in values.items()}
    try:
        return TrainConfig(**values)
    except TypeError as err:  # pragma: no cover - guarded by the key checks above
        raise TrainingError(str(err)) from err


def command_line_config(recipe: str | Path | None = None, *, progress: bool | None = None, **flags: Any) -> TrainConfig:
    """The :class:`TrainConfig` of a command line: defaults, then the recipe file, then the flags given.

    A flag not given is ``None``; a switch (``--resume``, ``--compile``) only switches on, so one
    not given (``False``) keeps the recipe's value too. ``progress`` is ``False`` for
    ``--no-progress``. Threads given nowhere: this process's share of the cores
    (:func:`~hc_retrofit.train.threads.default_threads`: threads x processes <= cores, never
    oversubscribed), where the Python API's default is the threads the process has.
    """
    from hc_retrofit.train.threads import default_threads

    given = {k: (v or None) if isinstance(v, bool) else v for k, v in flags.items()}
    cfg = merge(recipe, progress=progress, **given)
    if cfg.threads is None:
        cfg.threads = default_threads()
    return cfg
