"""`hc-retrofit compare`: does HC pay on this model and data, against an LR-tuned plain baseline?

Modules, one job each: :mod:`.spec` (arms, LR grids, seeds, per-trial train settings),
:mod:`.options` (a spec from the command's text options), :mod:`.runner` (run, skip or resume
each trial's ``train`` run dir), :mod:`.report` (best LR per arm on validation, held-out loss and
gain over seeds, plots, ``results.json``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from hc_retrofit import ownership
from hc_retrofit.compare.report import ArmSummary, CompareResult, best_settings, summarise, write_results
from hc_retrofit.compare.runner import TrialOutcome, compare_lock, prepare_out, run_all
from hc_retrofit.compare.spec import Arm, CompareSpec, Trial


def run_compare(
    spec: CompareSpec,
    *,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    load: Callable[[], tuple[Any, Any]] | None = None,
) -> CompareResult:
    """Run (or resume) every trial of ``spec`` and write ``results.json`` and ``compare.png`` under ``spec.out``.

    ``load`` returns a fresh (model, tokenizer) per trial instead of loading ``spec.model`` from disk.
    """
    spec.validate()
    with compare_lock(spec):
        prepare_out(spec, overwrite=overwrite)
        outcomes = run_all(spec, progress=progress, log=log, load=load)
        result = write_results(spec, outcomes)
        written = [n for n in ("runs", "results.json", "compare.png") if (Path(spec.out) / n).exists()]
        ownership.record(spec.out, written)
        return result


__all__ = [
    "Arm",
    "ArmSummary",
    "CompareResult",
    "CompareSpec",
    "Trial",
    "TrialOutcome",
    "best_settings",
    "run_compare",
    "summarise",
]
