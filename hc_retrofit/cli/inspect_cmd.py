"""``hc-retrofit inspect DIR``: the learned hyper-connection coefficients and the stream divergence."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any

import typer

from hc_retrofit.cli.core import app, console, err_console, quiet_library_progress
from hc_retrofit.cli.tables import print_fitted


def _vector(values: list[float]) -> str:
    """``[0.25 0.25]``, escaped: rich would read ``[nan nan]`` as a style tag."""
    from rich.markup import escape

    return escape("[" + " ".join(f"{v:.2f}" for v in values) + "]")


def json_safe(value: Any) -> Any:
    """``value`` with NaN and infinities as ``None`` (JSON has no NaN: ``null`` keeps the output valid)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def divergence_line(divergence: list[float], *, last_layer: int) -> str:
    """The stream divergence by layer index, or "0" when it is float noise (a model as converted)."""
    from hc_retrofit.plots import DIVERGENCE_NOISE

    if not divergence:
        return "stream divergence: no layer outputs streams"
    if max(divergence) < DIVERGENCE_NOISE:
        return (
            f"stream divergence: 0 after every layer, the streams are identical as at conversion "
            f"(max {max(divergence):.0e} is float rounding)"
        )
    by_layer = ", ".join(f"layer {i}: {v:.2e}" for i, v in enumerate(divergence))
    return f"stream divergence after {by_layer} (layer {last_layer} averages the streams back into one)"


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
    from hc_retrofit.inspection import inspect_checkpoint
    from hc_retrofit.modeling.errors import OutputExistsError
    from hc_retrofit.outputs import check_output_file
    from hc_retrofit.plots import plot_report

    if plot is not None:
        from hc_retrofit.plots import new_figure

        plot = check_output_file(plot, "--plot", suffixes=(".png", ".svg", ".pdf", ".jpg"))
        new_figure()  # without matplotlib: the one-line "[plot] extra" error now, not after the work
    quiet_library_progress()
    with err_console.status("loading and probing", spinner="dots"):
        report = inspect_checkpoint(directory)
    if as_json:
        console.print_json(json.dumps(json_safe(report.to_dict()), allow_nan=False))
    else:
        title = f"hyper-connections of {directory} ({report.variant}, {report.num_streams} streams)"
        headers = ("layer", "site", "width a", "depth b", "|R - I|", "R to doubly stoch.")
        rows = [
            (
                str(s.layer),
                str(s.site),
                _vector(s.width),
                _vector(s.depth),
                f"{s.residual_identity_distance:.4f}",
                f"{s.residual_doubly_stochastic_distance:.2e}",
            )
            for s in report.sites
        ]
        print_fitted(console, title, headers, rows, right=("layer", "site"))
        console.print(divergence_line(report.stream_divergence, last_layer=max(s.layer for s in report.sites)))
    if plot is not None:
        try:
            written = plot_report(report, plot)
        except OSError as err:
            raise OutputExistsError(
                f"--plot {plot}: cannot write it ({err.strerror or err}); choose another path"
            ) from err
        err_console.print(f"plot written to {written}")
