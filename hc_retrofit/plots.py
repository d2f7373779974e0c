"""The package's PNG plots: training loss curves and the learned hyper-connections.

Drawn on a bare :class:`matplotlib.figure.Figure` (no ``pyplot``, no ``matplotlib.use``): nothing
global changes, so calling these from a notebook leaves its plotting backend and open figures
alone. matplotlib is an optional dependency (``pip install "hc-retrofit[plot]"``); without it these
functions raise a one-line :class:`~hc_retrofit.modeling.errors.HCRetrofitError` naming the extra.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hc_retrofit.extras import missing_extra_hint
from hc_retrofit.modeling.errors import HCRetrofitError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from hc_retrofit.inspection import InspectionReport

# Stream divergence below this is float rounding of identical streams (fp32: ~1e-8), not learning.
DIVERGENCE_NOISE = 1e-6


def new_figure(**kwargs: Any) -> Figure:
    """A figure that belongs to no pyplot state machine (raises a one-line error without matplotlib)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise HCRetrofitError(missing_extra_hint(err) or f"cannot import matplotlib: {err}") from err
    return Figure(**kwargs)


def _save(fig: Figure, out_png: str | Path, dpi: int) -> Path:
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    return out


def plot_losses(
    runs: dict[str, Iterable[dict[str, Any]]], out_png: str | Path, *, title: str = "hc-retrofit training"
) -> Path:
    """Write :func:`loss_figure` to a PNG."""
    return _save(loss_figure(runs, title=title), out_png, 110)


def loss_figure(runs: dict[str, Iterable[dict[str, Any]]], *, title: str = "hc-retrofit training") -> Figure:
    """Train loss (thin line) and held-out eval loss (markers, step 0 included) of one or more runs, as a PNG.

    Eval points are markers; from 4 evals on a dotted line joins them. With the two or three evals of
    a short run a line would read as a second curve cutting across the train curve. The first and last
    eval values are written beside their markers.
    """
    fig = new_figure(figsize=(7, 4.2), dpi=110)
    ax = fig.add_subplot()
    for i, (label, rows) in enumerate(runs.items()):
        rows = list(rows)
        color = f"C{i}"
        train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
        evals = [(r["step"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]
        if train:
            marker = "." if len(train) < 30 else None
            ax.plot(*zip(*train, strict=True), color=color, alpha=0.5, lw=0.9, marker=marker, label=f"{label} train")
        if evals:
            steps, values = zip(*evals, strict=True)
            joined = ":" if len(evals) >= 4 else ""
            ax.plot(steps, values, color=color, ls=joined, lw=1.0, marker="o", ms=5, mec="black", mew=0.6)
            ax.plot([], [], color=color, ls="", marker="o", ms=5, mec="black", mew=0.6, label=f"{label} eval")
            for k in {0, len(evals) - 1}:
                ax.annotate(
                    f"{values[k]:.3f}", (steps[k], values[k]), textcoords="offset points", xytext=(4, 5), fontsize=7
                )
    ax.set_xlabel("optimiser step (step 0 = the model as loaded)")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_report(report: InspectionReport, out_png: str | Path) -> Path:
    """Write :func:`report_figure` to a PNG."""
    return _save(report_figure(report), out_png, 100)


def report_figure(report: InspectionReport) -> Figure:
    """One figure: ``a`` and ``b`` per site, stream divergence per layer, and ``R - I`` as an n x n map per site.

    Sites are labelled ``L<layer>.s<site>``; the divergence is drawn per layer index (the last layer
    averages the streams back and has none). When every divergence is float noise (a model as
    converted), the panel says so instead of drawing bars of noise.
    """
    n = report.num_streams
    sites = report.sites
    labels = [f"L{s.layer}.s{s.site}" for s in sites]
    cols = min(len(sites), 8)
    rows = math.ceil(len(sites) / cols)
    site_rows = max(3.0, 0.22 * len(sites) + 1.2)
    fig = new_figure(figsize=(max(13.0, 1.6 * cols), site_rows + 1.7 * rows + 0.6), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[site_rows, 1.7 * rows])
    ax_a, ax_b, ax_div = top.subplots(1, 3)
    for ax, key, title in ((ax_a, "width", "width a"), (ax_b, "depth", "depth b")):
        data = [getattr(s, key) for s in sites]
        image = ax.imshow(data, aspect="auto", cmap="viridis")
        ax.set_title(f"{title} (row = site, column = stream)", fontsize=9)
        ax.set_yticks(range(len(sites)), labels, fontsize=6 if len(sites) > 24 else 8)
        ax.set_xticks(range(n))
        ax.set_xlabel("stream")
        low, high = min(map(min, data)), max(map(max, data))
        if len(sites) * n <= 96:  # small models: print the values in the cells
            for r, row in enumerate(data):
                for c, v in enumerate(row):
                    dark = high == low or (v - low) / (high - low) < 0.6
                    ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=6, color="white" if dark else "black")
        top.colorbar(image, ax=ax, fraction=0.046)
    _divergence_panel(ax_div, report.stream_divergence, last_layer=max(s.layer for s in sites))

    mixes = [
        [[v - (1.0 if i == j else 0.0) for j, v in enumerate(row)] for i, row in enumerate(s.residual)] for s in sites
    ]
    limit = max((abs(v) for m in mixes for row in m for v in row), default=0.0) or 1.0
    axes = bottom.subplots(rows, cols, squeeze=False)
    image = None
    for k, ax in enumerate(axes.flat):
        if k >= len(sites):
            ax.set_axis_off()
            continue
        image = ax.imshow(mixes[k], cmap="coolwarm", vmin=-limit, vmax=limit)
        if n <= 4:
            for i, row in enumerate(mixes[k]):
                for j, v in enumerate(row):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6)
        ax.set_title(labels[k], fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    bottom.suptitle("R - I per site (row = output stream, column = input stream)", fontsize=9)
    if image is not None:
        bottom.colorbar(image, ax=axes, fraction=0.02)
    fig.suptitle(f"hyper-connections: {report.variant}, {n} streams")
    return fig


def _divergence_panel(ax: Any, divergence: list[float], *, last_layer: int) -> None:
    ax.set_title("stream divergence after each layer", fontsize=9)
    ax.set_xlabel(f"layer (layer {last_layer}, the last, averages the streams back into one)", fontsize=8)
    if not divergence:
        ax.text(0.5, 0.5, "no layer outputs streams", ha="center", va="center", transform=ax.transAxes)
        return
    if max(divergence) < DIVERGENCE_NOISE:
        ax.text(
            0.5,
            0.5,
            f"0 after every layer: the streams are identical\n(as converted; max {max(divergence):.0e} is float rounding)",
            ha="center",
            va="center",
            fontsize=9,
            transform=ax.transAxes,
        )
        ax.set_xticks(range(len(divergence)))
        ax.set_xlim(-0.5, len(divergence) - 0.5)
        ax.set_yticks([])
        return
    ax.bar(range(len(divergence)), divergence, color="C1")
    ax.set_xticks(range(len(divergence)))
    ax.set_ylabel("||H - mean H|| / (sqrt(n) ||mean H||)", fontsize=7)
