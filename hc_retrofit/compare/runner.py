"""Run the trials of a comparison: skip finished runs, resume interrupted ones, record divergence.

Layout of ``OUT``: ``compare.json`` (the settings; a later call must share them to resume),
``runs/ARM/lrLR[-xMULT]/seedS/`` (one ordinary ``train`` run dir per trial), and what
:mod:`hc_retrofit.compare.report` writes (``results.json``, ``compare.png``).

A trial is *finished* when its run dir has ``summary.json`` (written by ``train`` at the very
end) or ``diverged.json`` (written here when the loss went non-finite: that setting counts as
infinitely bad, and re-running it would diverge again). Any other existing run dir is resumed
from its newest checkpoint with ``--resume`` semantics.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hc_retrofit import outputs, ownership
from hc_retrofit.compare.outcomes import (
    COMPARE_CLAIMS,
    COMPARE_FILE,
    DIVERGED_FILE,
    LOCK_FILE,
    OWNED,
    TrialOutcome,
    best_settings,
    is_finished,
    read_outcome,
)
from hc_retrofit.compare.spec import CompareSpec, Trial
from hc_retrofit.train.errors import NonFiniteLossError, TrainingError


def check_out(spec: CompareSpec) -> Path:
    """``spec.out`` if a comparison may be written there (nothing is written): new, or a comparison's."""
    out = Path(spec.out)
    ours = (outputs.MARKER, LOCK_FILE)
    if out.exists() and any(p.name not in ours for p in out.iterdir()) and not (out / COMPARE_FILE).exists():
        raise TrainingError(f"{out} exists and holds no comparison ({COMPARE_FILE}): pick another --out")
    outputs.check_output_dir(out, overwrite=False, resume=True, inputs=[spec.model, spec.data, spec.recipe])
    return out


def prepare_out(spec: CompareSpec, *, overwrite: bool = False) -> Path:
    """Create ``spec.out``, or check that the comparison already in it shares ``spec``'s settings.

    ``overwrite`` deletes only what a comparison writes (:data:`OWNED`), never other files. The
    general output rules apply too (:func:`hc_retrofit.outputs.check_output_dir`: never the current
    or home directory, never over or inside an input).
    """
    out = check_out(spec)
    marker = out / COMPARE_FILE
    if marker.exists():
        if overwrite:
            lost = [name for name in ownership.lost_files(out) if name != LOCK_FILE]
            if lost:
                shown = ", ".join(lost[: ownership.SHOWN]) + (" and more" if len(lost) > ownership.SHOWN else "")
                raise TrainingError(
                    f"{out} holds files hc-retrofit did not write or that changed since ({shown}); --overwrite "
                    "would lose them: move them away or choose another --out"
                )
            for name in OWNED:
                path = out / name
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
        else:
            previous = json.loads(marker.read_text()).get("fingerprint")
            diff = fingerprint_diff(previous["train"], spec.fingerprint()["train"])
            if diff:
                raise TrainingError(
                    f"{out} holds a comparison with other settings ({', '.join(diff)}): "
                    "use the same settings to resume it, another --out, or --overwrite"
                )
    ownership.adopt_dir(out, "compare")
    ownership.claim(out, COMPARE_CLAIMS)
    marker.write_text(json.dumps({"spec": spec.to_dict(), "fingerprint": spec.fingerprint()}, indent=2))
    ownership.record(out, [COMPARE_FILE, *(n for n in OWNED if n != COMPARE_FILE and not (out / n).exists())])
    return out


@contextmanager
def compare_lock(spec: CompareSpec) -> Iterator[None]:
    """Hold ``OUT/compare.lock`` while the comparison runs; refuse if a live process holds it.

    Two ``compare`` calls on one ``--out`` would train the same run dirs at once (each resuming or
    starting over what the other writes). A lock left by a process that died is taken over.
    """
    out = check_out(spec)
    existed = out.exists()
    ownership.adopt_dir(out, "compare")
    path = out / LOCK_FILE
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            pid = _lock_pid(path)
            if pid is not None and _alive(pid):
                _remove_if_untouched(out, existed)
                raise TrainingError(
                    f"{out} is being run by another compare (process {pid}): wait for it to finish, "
                    "or use another --out"
                ) from None
            path.unlink(missing_ok=True)  # its process is gone
    else:  # pragma: no cover - another process took it between our unlink and open
        raise TrainingError(f"{out} is being run by another compare: wait for it to finish, or use another --out")
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    ownership.record(out, [LOCK_FILE])
    try:
        yield
    except BaseException:
        path.unlink(missing_ok=True)
        ownership.record(out, [LOCK_FILE])
        _remove_if_untouched(out, existed)
        raise
    path.unlink(missing_ok=True)
    ownership.record(out, [LOCK_FILE])


def _remove_if_untouched(out: Path, existed: bool) -> None:
    """A comparison refused before it trained anything leaves no trace: its new ``out`` goes."""
    if existed or not out.is_dir():
        return
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if not p.is_dir()}
    if files <= {outputs.MARKER, LOCK_FILE, COMPARE_FILE}:  # only bookkeeping and empty run folders
        shutil.rmtree(out, ignore_errors=True)


def _lock_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - someone else's process
        return True
    return True


def fingerprint_diff(previous: dict[str, Any], mine: dict[str, Any]) -> list[str]:
    """The train settings that differ; a key one side lacks (a setting added to ``train`` since) is its default.

    Without the default, every comparison written before a new setting existed would be refused as
    "other settings" although nothing differs.
    """
    from hc_retrofit.train.recipe import TrainConfig

    defaults = TrainConfig().to_dict()
    return sorted(
        k for k in set(previous) | set(mine)
        if previous.get(k, defaults.get(k)) != mine.get(k, defaults.get(k))
    )  # fmt: skip


def run_trial(
    spec: CompareSpec, trial: Trial, *, progress: bool = True, model: Any = None, tokenizer: Any = None
) -> TrialOutcome:
    """Train ``trial`` unless it is finished (then just read it); return its outcome.

    An unfinished run dir continues from its newest checkpoint; one without a checkpoint (stopped
    before the first save) is started over.
    """
    from hc_retrofit.train.checkpoint import latest_checkpoint
    from hc_retrofit.train.loop import train

    cfg = spec.trial_config(trial, progress=progress)
    run_dir = Path(cfg.out)
    if not is_finished(run_dir):
        started = run_dir.is_dir() and any(p.name != outputs.MARKER for p in run_dir.iterdir())
        if started and latest_checkpoint(run_dir) is not None:
            cfg.resume = True
        elif started:
            cfg.overwrite = True
        try:
            train(cfg, model=model, tokenizer=tokenizer)
        except NonFiniteLossError as err:
            (run_dir / DIVERGED_FILE).write_text(json.dumps({"error": str(err), "step": err.step}))
            ownership.record(run_dir, [DIVERGED_FILE])
    return read_outcome(trial, run_dir)


def run_all(
    spec: CompareSpec,
    *,
    progress: bool = True,
    log: Callable[[str], None] = print,
    load: Callable[[], tuple[Any, Any]] | None = None,
) -> list[TrialOutcome]:
    """Run (or read) the grid on the tuning seeds, then each arm's best setting on the other seeds.

    ``load`` returns a fresh (model, tokenizer) per trial instead of loading ``spec.model``.
    """
    outcomes: list[TrialOutcome] = []

    def run(trials: list[Trial], phase: str) -> None:
        for i, trial in enumerate(trials, 1):
            done = is_finished(Path(spec.out) / trial.relpath)
            model, tokenizer = load() if load and not done else (None, None)
            outcome = run_trial(spec, trial, progress=progress, model=model, tokenizer=tokenizer)
            outcomes.append(outcome)
            mult = "" if trial.hc_lr_multiplier is None else f" x{trial.hc_lr_multiplier:g}"
            result = (
                f"diverged ({outcome.diverged.split(':')[0]})"
                if outcome.diverged
                else f"validation {outcome.validation_loss:.4f}  held-out {outcome.heldout_loss:.4f}"
            )
            log(
                f"[{phase} {i}/{len(trials)}] {trial.arm.name:<12} lr {trial.lr:g}{mult:<6} seed {trial.seed}: "
                f"{result}{'  (already done)' if done else ''}"
            )

    run(spec.grid_trials(), "grid")
    rest = [s for s in spec.seeds if s not in spec.tuning_seeds]
    if rest:
        best = best_settings(spec, outcomes)
        run([Trial(arm, *best[arm], seed) for seed in rest for arm in spec.arms], "seeds")
    return outcomes
