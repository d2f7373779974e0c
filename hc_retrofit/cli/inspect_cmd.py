"""``hc-retrofit inspect DIR``: the learned hyper-connection coefficients and the stream divergence."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from hc_retrofit.cli.app import app, console, err_console
from hc_retrofit.inspection import inspect_checkpoint, plot_report


def _vector(values: list[float]) -> str:
    return "[" + " ".join(f"{v:.2f}" for v in values) + "]"


@app.command("inspect")
def inspect_command(
    directory: Annotated[Path, typer.Argument(metavar="DIR", help="A converted checkpoint directory.")],
    plot: Annotated[
        Path | None, typer.Option("--plot", help="Also draw heatmaps of a, b, R - I to this PNG file.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Show per site the width weights a, the mixing matrix R and the depth weights b, and per layer the stream divergence.

    R's distance from the identity (and, for mHC, from the doubly stochastic matrices) shows how far the
    streams mix; stream divergence is 0 at conversion and grows with training.
    """
    with err_console.status("loading and probing", spinner="dots"):
        report = inspect_checkpoint(directory)
    if as_json:
        console.print_json(json.dumps(report.to_dict()))
    else:
        table = Table(title=f"hyper-connections of {directory} ({report.variant}, {report.num_streams} streams)")
        for column in ("layer", "site", "width a", "depth b", "|R - I|", "R to doubly stoch."):
            table.add_column(column, justify="right" if column in ("layer", "site") else "left", no_wrap=True)
        for s in report.sites:
            table.add_row(
                str(s.layer),
                str(s.site),
                _vector(s.width),
                _vector(s.depth),
                f"{s.residual_identity_distance:.4f}",
                f"{s.residual_doubly_stochastic_distance:.2e}",
            )
        console.print(table)
        spread = ", ".join(f"{v:.2e}" for v in report.stream_divergence)
        console.print(f"stream divergence per layer (0 at init, grows with training): {spread}")
    if plot is not None:
        written = plot_report(report, plot)
        err_console.print(f"plot written to {written}")
