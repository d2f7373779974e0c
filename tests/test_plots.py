"""The PNG plots: readable labels, "0 at init" instead of noise, eval markers, no global matplotlib state."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hc_retrofit.inspection import InspectionReport, SiteReport
from hc_retrofit.plots import loss_figure, plot_losses, plot_report, report_figure

REPO = Path(__file__).resolve().parents[1]
N = 3


def _report(divergence: list[float], layers: int = 2) -> InspectionReport:
    eye = [[1.0 if i == j else 0.0 for j in range(N)] for i in range(N)]
    sites = [
        SiteReport(
            layer=layer,
            site=2 * layer + k,
            width=[1.0, 0.0, 0.0],
            residual=eye,
            depth=[1.0] * N,
            residual_identity_distance=0.0,
            residual_doubly_stochastic_distance=0.0,
            dynamic_scale=None,
            dynamic_proj_norm=None,
        )
        for layer in range(layers)
        for k in range(2)
    ]
    return InspectionReport(variant="static", num_streams=N, sites=sites, stream_divergence=divergence)


def _axes(fig) -> dict[str, object]:
    found = {}
    for sub in [fig, *fig.subfigs]:
        found.update({ax.get_title(): ax for ax in sub.axes})
    return found


def _texts(ax) -> str:
    return " ".join(t.get_text() for t in ax.texts)


def test_report_at_init_says_zero_instead_of_plotting_float_noise() -> None:
    axes = _axes(report_figure(_report([3e-8])))
    divergence = axes["stream divergence after each layer"]
    assert not divergence.patches  # no bars of noise
    assert "0 after every layer" in _texts(divergence)


def test_report_after_training_draws_divergence_by_layer_and_r_minus_i_per_site() -> None:
    axes = _axes(report_figure(_report([0.25, 0.5], layers=3)))
    divergence = axes["stream divergence after each layer"]
    assert [round(p.get_height(), 2) for p in divergence.patches] == [0.25, 0.5]
    assert [t.get_text() for t in divergence.get_xticklabels()] == ["0", "1"]
    assert "layer 2, the last" in divergence.get_xlabel()
    for label in ("L0.s0", "L0.s1", "L1.s2", "L1.s3", "L2.s4", "L2.s5"):  # one n x n map per site
        assert axes[label].get_images()[0].get_array().shape == (N, N)
    width = next(ax for title, ax in axes.items() if title.startswith("width a"))
    assert [t.get_text() for t in width.get_yticklabels()][:2] == ["L0.s0", "L0.s1"]


def test_loss_plot_marks_every_eval_including_step_0() -> None:
    rows = [
        {"step": 0, "eval_loss": 5.4},
        *({"step": s, "loss": 5.0 - s / 60} for s in range(60)),
        {"step": 60, "eval_loss": 3.0},
    ]
    ax = loss_figure({"HC": rows}).axes[0]
    evals = [line for line in ax.get_lines() if line.get_marker() == "o" and len(line.get_xdata())]
    assert len(evals) == 1 and list(evals[0].get_xdata()) == [0, 60]
    assert evals[0].get_linestyle() == "None"  # two evals: no line cutting across the train curve
    assert {"5.400", "3.000"} <= {t.get_text() for t in ax.texts}
    more = [{"step": s, "eval_loss": 5.0 - s / 100} for s in range(0, 100, 20)]
    ax = loss_figure({"HC": more}).axes[0]
    assert next(ln for ln in ax.get_lines() if ln.get_marker() == "o" and len(ln.get_xdata())).get_linestyle() == ":"


def test_plots_leave_matplotlib_global_state_alone(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    code = (
        "import sys, matplotlib\n"
        "matplotlib.use('svg')\n"
        "from hc_retrofit.plots import plot_losses\n"
        f"plot_losses({{'run': [{{'step': 0, 'loss': 1.0}}]}}, {str(tmp_path / 'loss.png')!r})\n"
        "print(matplotlib.get_backend(), 'matplotlib.pyplot' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["svg", "False"]
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_png_files_are_written(tmp_path: Path) -> None:
    assert plot_report(_report([0.1]), tmp_path / "a" / "r.png").stat().st_size > 1000
    assert plot_losses({"x": [{"step": 0, "eval_loss": 1.0}]}, tmp_path / "l.png").stat().st_size > 1000
