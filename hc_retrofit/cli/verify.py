"""``hc-retrofit verify DIR``: check that a converted checkpoint still computes its base model's function."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from hc_retrofit.cli.core import app, console, err_console, quiet_library_progress


@app.command("verify")
def verify_command(
    directory: Annotated[Path, typer.Argument(metavar="DIR", help="A converted checkpoint directory.")],
    base: Annotated[str | None, typer.Option("--base", help="Base model (default: the one recorded in DIR).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    trained: Annotated[
        bool, typer.Option("--trained", help="DIR was trained: report the difference, do not fail on it.")
    ] = False,
    mode: Annotated[
        str,
        typer.Option(
            "--mode",
            help="How to load the models: memory (both whole, in float32), layers (one decoder layer at a time, "
            "for models larger than the memory; the same numbers), auto (layers when the model would not fit).",
        ),
    ] = "auto",
) -> None:
    """Run DIR and its base model on a probe batch and compare logits, KL divergence and greedy generation.

    Exit code 0 when they are equivalent within tolerance (or with --trained), 1 otherwise.
    """
    from hc_retrofit.modeling.errors import ConfigError
    from hc_retrofit.verify import LAYERS, MODES, choose_mode, verify_checkpoint

    if mode not in MODES:
        raise ConfigError(f"unknown --mode {mode!r}: choose one of {', '.join(MODES)}")
    quiet_library_progress()
    if mode == "auto" and (directory / "config.json").is_file():
        mode = "layers" if choose_mode(directory) == LAYERS else "memory"
    doing = (
        "running both models layer by layer"
        if mode == "layers"
        else "loading the base, then the checkpoint into it, and comparing"
    )
    with err_console.status(doing, spinner="dots"):
        report = verify_checkpoint(directory, base, trained=trained, mode=mode)
    if as_json:
        console.print_json(json.dumps(report.to_dict()))
    else:
        table = Table(title=f"verify {report.converted_dir}", show_header=False, box=None)
        precision = "" if report.base_dtype == "float32" else f" (weights rounded to {report.base_dtype}, as DIR's)"
        table.add_row("base model", report.base_model + precision)
        table.add_row("hyper-connections", f"{report.variant}, {report.num_streams} streams")
        table.add_row(
            "loaded", report.loading + (" (one decoder layer in memory at a time)" if report.loading == LAYERS else "")
        )
        table.add_row("probe batch", f"{report.probe_shape[0]} x {report.probe_shape[1]} tokens")
        table.add_row("max |logit diff|", f"{report.max_abs_logit_diff:.3e} (tolerance {report.logit_tolerance:.1e})")
        table.add_row(
            "KL(base || converted)",
            f"mean {report.mean_kl:.3e}, max {report.max_kl:.3e} (tolerance {report.kl_tolerance:.0e})",
        )
        table.add_row("greedy generation", f"{100 * report.greedy_agreement:.1f}% of tokens agree")
        table.add_row(
            "shipped modeling code",
            "intact" if report.remote_code_ok else f"{len(report.remote_code_problems)} problems (below)",
        )
        console.print(table)
        for problem in report.remote_code_problems:
            console.print(f"  - {problem}", markup=False, highlight=False)
        if not report.remote_code_ok:
            console.print(
                "[red]NOT vouched for[/red]: users loading with trust_remote_code would run code that is not the "
                "modeling code this hc-retrofit writes; remove what is not ours, or re-save the checkpoint"
            )
        elif report.equivalent:
            console.print("[green]equivalent[/green]: the converted model computes the base model's function")
        elif report.trained:
            console.print("[yellow]trained[/yellow]: the model differs from its base, as expected after training")
        else:
            console.print(
                f"[red]NOT equivalent[/red] to the base model: {escape(str(report.difference))} "
                "(pass --trained if DIR was trained)"
            )
    if not report.ok:
        raise typer.Exit(1)
