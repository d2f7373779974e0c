"""Continued pretraining of converted (or, for ablations, plain) models with accelerate.

Modules, one job each: :mod:`.recipe` (settings + YAML), :mod:`.data` (load, tokenise, pack,
batch order), :mod:`.optim` (param groups, schedule), :mod:`.model` (load/convert/save),
:mod:`.checkpoint` (save/resume), :mod:`.metrics` (jsonl + plots), :mod:`.progress` (display),
:mod:`.threads` (CPU threads), :mod:`.strategy` (the accelerator: one process, DDP, FSDP2),
:mod:`.run_dir` (the run directory's lifecycle), :mod:`.trainer` (the loop), :mod:`.export` (the
final save), :mod:`.loop` (``train``: all of them in order), :mod:`.demo` (the bundled, offline
HC-vs-plain demo).
"""

try:
    import accelerate  # noqa: F401  (the [train] extra: accelerate, datasets, pyyaml)
    import datasets  # noqa: F401
    import yaml  # noqa: F401
except ImportError as _err:
    from hc_retrofit.extras import missing_extra_hint

    _hint = missing_extra_hint(_err)
    if _hint is None:
        raise
    raise ImportError(_hint, name=_err.name) from None

from hc_retrofit.train.errors import NonFiniteLossError, TrainingError
from hc_retrofit.train.loop import TrainResult, train
from hc_retrofit.train.recipe import DEFAULT_HC_LR_MULTIPLIER, TrainConfig, load_recipe, merge

__all__ = [
    "DEFAULT_HC_LR_MULTIPLIER",
    "NonFiniteLossError",
    "TrainConfig",
    "TrainResult",
    "TrainingError",
    "load_recipe",
    "merge",
    "train",
]
