"""Coverage measured by the product: build every model type of the installed transformers for a
task (causal LM by default; masked LM, image classification, base model) as a tiny random model,
convert it with each variant, and say what happened (``hc-retrofit architectures --check``).

Each variant of each model type ends in one outcome:

* ``exact``    -- converted and passed the proof of :func:`hc_retrofit.convert`;
* ``refused``  -- :func:`hc_retrofit.convert` refused (the reason is its one-line message);
* ``error``    -- a crash of ``convert`` (anything but a clear refusal): a bug;
* ``timeout``  -- building and converting took longer than the per-type budget.

A type is ``exact`` when every variant is, else it takes its worst variant's outcome (and the
table says which variant gave what). ``no tiny``: the type could not be built as a tiny random
model from its config here (it needs a special config or an input other than token ids or
pixels, or a forward of the *original* model fails), so nothing was tried.
"""

from __future__ import annotations

import contextlib
import io
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from hc_retrofit.modeling.config import VARIANTS, HCConfig
from hc_retrofit.modeling.errors import HCRetrofitError
from hc_retrofit.tasks import DEFAULT_TASK, TASKS, model_types
from hc_retrofit.tiny_models import build_tiny

# What the tables call each task's models.
TASK_LABELS = {
    "causal-lm": "causal-LM",
    "masked-lm": "masked-LM",
    "image-classification": "image-classification",
    "base": "base-model (AutoModel)",
}

OUTCOMES = ("exact", "refused", "error", "timeout", "no tiny")  # the order of the tables
SEVERITY = ("exact", "refused", "timeout", "error")  # a type takes its worst variant's outcome


@dataclass(frozen=True)
class SweepRow:
    """The outcome for one model type (``variants``: the outcome of each variant that ran)."""

    model_type: str
    outcome: str  # "exact" | "refused" | "error" | "timeout" | "no tiny"
    detail: str = ""  # structure kept (exact), or why not, per variant where they differ
    seconds: float = 0.0
    variants: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def task_types(task: str = DEFAULT_TASK) -> list[str]:
    """Every ``model_type`` the installed transformers has a model class for in ``task``."""
    return model_types(task)


def causal_lm_types() -> list[str]:
    """Every ``model_type`` of the installed transformers' ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``."""
    return model_types("causal-lm")


def _first_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:160]}"


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Tiny random configs make transformers warn a lot; none of it is the sweep's output."""
    import transformers

    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        transformers.logging.set_verbosity(level)


class SweepTimeout(BaseException):
    """A model type took longer than its time budget (some configs build huge defaults).

    A ``BaseException``, like ``KeyboardInterrupt``: :func:`hc_retrofit.convert` turns any
    ``Exception`` of a candidate into a refusal, and a timeout is not a refusal."""


@contextlib.contextmanager
def memory_limit(gigabytes: float | None) -> Iterator[None]:
    """Cap this process's address space (POSIX) so that a type whose tiny config still allocates
    huge defaults fails with a MemoryError (reported as ``no tiny``) instead of exhausting the machine."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    if not gigabytes:
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = int(gigabytes * 2**30)
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@contextlib.contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Raise :class:`SweepTimeout` in the block after ``seconds`` (main thread on POSIX; else no limit)."""
    if not seconds or threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def _raise(signum: int, frame: Any) -> None:
        raise SweepTimeout(f"took more than {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def sweep_one(
    model_type: str,
    variants: Iterable[str] = VARIANTS,
    num_streams: int = 4,
    timeout: float | None = 300.0,
    task: str = DEFAULT_TASK,
) -> SweepRow:
    """Build ``model_type`` tiny for ``task`` and convert a fresh copy with each variant (within
    ``timeout`` seconds for all of them)."""
    from hc_retrofit.modeling.families import family_for
    from hc_retrofit.proof import convert

    start = time.perf_counter()
    variants = tuple(variants)

    def left() -> float | None:
        return None if timeout is None else max(1.0, timeout - (time.perf_counter() - start))

    with _quiet():
        try:
            with time_limit(timeout):
                first = build_tiny(model_type, task=task)
        except SweepTimeout as err:
            return SweepRow(model_type, "no tiny", f"building it {err}", round(time.perf_counter() - start, 2))
        except Exception as err:
            return SweepRow(model_type, "no tiny", _first_line(err), round(time.perf_counter() - start, 2))
        results: dict[str, tuple[str, str]] = {}
        for variant in variants:
            try:
                with time_limit(left()):
                    model, first = first or build_tiny(model_type, task=task), None  # a fresh model per variant
                    convert(model, HCConfig(num_streams=num_streams, variant=variant))
                    results[variant] = ("exact", family_for(model.config).describe(model.config))
            except SweepTimeout as err:
                results[variant] = ("timeout", str(err))
                break  # the type's time is used up
            except HCRetrofitError as err:
                results[variant] = ("refused", str(err))
            except Exception as err:
                results[variant] = ("error", _first_line(err))
    outcome = max((o for o, _ in results.values()), key=SEVERITY.index)
    return SweepRow(
        model_type,
        outcome,
        _detail(results),
        round(time.perf_counter() - start, 2),
        {v: o for v, (o, _) in results.items()},
    )


def _detail(results: dict[str, tuple[str, str]]) -> str:
    """One line: the structure or reason, prefixed by the variants it holds for when they differ."""
    groups: dict[tuple[str, str], list[str]] = {}
    for variant, result in results.items():
        groups.setdefault(result, []).append(variant)
    if len(groups) == 1:
        (outcome, detail), names = next(iter(groups.items()))
        return detail if outcome == "exact" else f"{', '.join(names)}: {detail}"
    return "; ".join(f"{', '.join(names)}: {outcome} ({detail})" for (outcome, detail), names in groups.items())


def sweep(
    model_types: Iterable[str] | None = None,
    variants: Iterable[str] = VARIANTS,
    progress: Callable[[SweepRow], None] | None = None,
    timeout: float | None = 300.0,
    max_memory_gb: float | None = 8.0,
    task: str = DEFAULT_TASK,
) -> list[SweepRow]:
    """:func:`sweep_one` for each type (default: every type of the installed transformers for
    ``task``), in at most ``max_memory_gb`` of address space."""
    rows = []
    with memory_limit(max_memory_gb):
        for model_type in model_types if model_types is not None else task_types(task):
            row = sweep_one(model_type, tuple(variants), timeout=timeout, task=task)
            rows.append(row)
            if progress is not None:
                progress(row)
    return rows


def coverage(rows: Iterable[SweepRow]) -> dict[str, Any]:
    """Counts per outcome and the share of tiny-buildable types that convert exactly."""
    rows = list(rows)
    counts = {k: sum(r.outcome == k for r in rows) for k in OUTCOMES}
    built = len(rows) - counts["no tiny"]
    return {**counts, "types": len(rows), "built": built, "exact_share": counts["exact"] / built if built else 0.0}


def check_command(task: str = DEFAULT_TASK) -> str:
    """The command that measures ``task`` (printed with its table)."""
    return "hc-retrofit architectures --check --markdown" + ("" if task == DEFAULT_TASK else f" --task {task}")


def markdown(rows: Iterable[SweepRow], variants: Iterable[str] = VARIANTS, task: str = DEFAULT_TASK) -> str:
    """The README's supported-architectures table: coverage line, then one row per model type."""
    import transformers

    rows = sorted(rows, key=lambda r: (OUTCOMES.index(r.outcome), r.model_type))
    c = coverage(rows)
    label = TASK_LABELS[task] if task in TASKS else task
    lines = [
        f"Measured with transformers {transformers.__version__}, variants {', '.join(variants)}: "
        f"**{c['exact']} of {c['built']} {label} types that build as tiny random models convert exactly "
        f"({100 * c['exact_share']:.1f}%)**; {c['refused']} refused, {c['error'] + c['timeout']} failed, "
        f"{c['no tiny']} of the {c['types']} types could not be built tiny. "
        f"Reproduce: `{check_command(task)}`.",
        "",
        "| model_type | outcome | structure kept, or why not (per variant where they differ) |",
        "|---|---|---|",
    ]
    for row in rows:
        detail = row.detail.replace("|", "\\|")
        lines.append(f"| {row.model_type} | {row.outcome} | {detail} |")
    return "\n".join(lines) + "\n"
