"""The training progress bar: no placeholder NaN loss or 0 tok/s before the first step is measured."""

from __future__ import annotations

import io

from rich.console import Console

from hc_retrofit.train.progress import TrainProgress


def _render(progress: TrainProgress) -> str:
    out = Console(file=io.StringIO(), width=160, color_system=None)
    out.print(progress.progress.get_renderable())
    return out.file.getvalue()


def test_bar_starts_without_nan_and_shows_the_measured_values_after_a_step() -> None:
    progress = TrainProgress(total=10)
    first = _render(progress)
    assert "nan" not in first.lower() and "0 tok/s" not in first
    assert "loss -" in first and "- tok/s" in first
    progress.update(1, 4.5, 1234.0)
    after = _render(progress)
    assert "loss 4.5000" in after and "1,234 tok/s" in after


def test_a_real_nan_loss_is_shown_as_nan() -> None:
    progress = TrainProgress(total=10)
    progress.update(3, float("nan"), 100.0)
    assert "loss nan" in _render(progress)
