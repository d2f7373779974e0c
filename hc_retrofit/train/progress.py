"""The progress display of a training run (rich): step bar with loss, tokens/s, ETA; eval lines.

On a terminal it is a live bar; when output is not a terminal (CI, logs) rich prints nothing
live, so each eval (and the end) is also printed as a plain line, which is what logs keep.
"""

from __future__ import annotations

import math
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def _fields(loss: float | None, tokens_per_s: float | None) -> dict[str, str]:
    """The bar's loss and speed texts: ``loss -`` and ``- tok/s`` before the first step is measured.

    Printing the placeholder NaN loss and 0 tok/s would read like the NaN guard firing.
    """
    return {
        "loss": "loss -" if loss is None else f"loss {loss:.4f}",
        "tps": "- tok/s" if not tokens_per_s else f"{tokens_per_s:,.0f} tok/s",
    }


class TrainProgress:
    """A context manager. ``enabled``: live bar (main process, unless ``--no-progress``); ``lines``:
    print the eval lines (main process only)."""

    def __init__(
        self, total: int, start: int = 0, *, enabled: bool = True, lines: bool = True, hc: bool = True
    ) -> None:
        self.enabled = enabled
        self.lines = lines
        self.console = Console(stderr=True)
        self.total = total
        self._last = {"loss": math.nan, "tps": 0.0}
        if not enabled:
            return
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[loss]}"),
            TextColumn("{task.fields[tps]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
        )
        self.task = self.progress.add_task(
            "train (HC)" if hc else "train (plain)", total=total, completed=start, **_fields(None, None)
        )

    def __enter__(self) -> TrainProgress:
        if self.enabled:
            self.progress.start()
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self.enabled:
            self.progress.stop()

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        self._last = {"loss": loss, "tps": tokens_per_s}
        if self.enabled:
            self.progress.update(self.task, completed=step, **_fields(loss, tokens_per_s))

    def note_eval(self, step: int, eval_loss: float | None) -> None:
        if not self.lines or eval_loss is None:
            return
        ppl = math.exp(min(eval_loss, 50.0))
        train = "" if math.isnan(self._last["loss"]) else f"  train loss {self._last['loss']:.4f}"
        speed = f"  {self._last['tps']:,.0f} tok/s" if self._last["tps"] else ""
        (self.progress.console if self.enabled else self.console).print(
            f"step {step:>6}/{self.total}{train}  eval loss {eval_loss:.4f} (ppl {ppl:.2f}){speed}"
        )
