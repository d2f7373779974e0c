"""Continued pretraining of converted (or, for ablations, plain) models with accelerate.

Modules, one job each: :mod:`.recipe` (settings + YAML), :mod:`.data` (load, tokenise, pack,
batch order), :mod:`.optim` (param groups, schedule), :mod:`.model` (load/convert/save),
:mod:`.checkpoint` (save/resume), :mod:`.metrics` (jsonl + plots), :mod:`.progress` (display),
:mod:`.loop` (the loop), :mod:`.demo` (the bundled, offline HC-vs-plain demo).
"""

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
