"""`hc-retrofit demo`: build a small model offline, convert, verify, train plain vs HC, compare."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hc_retrofit.cli.app import app, quiet_library_progress


@app.command("demo")
def demo_command(
    out: Annotated[Path, typer.Option(help="Where the runs, table and plot go.")] = Path("hc-retrofit-demo"),
    steps: Annotated[int, typer.Option(help="Training steps per run.")] = 300,
    quick: Annotated[bool, typer.Option("--quick", help="Tiny model, 20 steps: a smoke test.")] = False,
    variants: Annotated[str, typer.Option(help="Comma-separated HC variants to compare with plain.")] = "mhc",
    streams: Annotated[int, typer.Option(help="HC streams.")] = 4,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No live progress bar.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an earlier demo's results in --out.")] = False,
) -> None:
    """Offline demo: small llama + bundled Shakespeare; plain vs hyper-connections, same data order."""
    from rich.console import Console
    from rich.table import Table

    from hc_retrofit.train.demo import run_demo

    quiet_library_progress()
    console = Console()
    result = run_demo(
        out,
        steps=20 if quick and steps == 300 else steps,
        quick=quick,
        variants=tuple(v.strip() for v in variants.split(",") if v.strip()),
        streams=streams,
        overwrite=overwrite,
        progress=not no_progress,
    )
    console.print(f"retrofit exact: max |logit diff| = {result.retrofit_max_abs_diff:.2e}")
    table = Table(title="plain vs hyper-connections (same model, data order and settings)")
    rows = result.table()
    for col in rows[0]:
        table.add_column(col, justify="left" if col == "run" else "right")
    for row in rows:
        table.add_row(*(_fmt(v) for v in row.values()))
    console.print(table)
    console.print(f"plot: {result.plot}\ntotal time: {result.seconds:.0f} s")


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if value > 100 else f"{value:.1f}" if value >= 10 else f"{value:.4f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)
