"""`hc-retrofit demo`: retrofit the bundled pretrained stories260K, verify it is exact, compare at fair LRs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hc_retrofit.cli.core import app, quiet_library_progress

DEFAULT_STEPS = 200
QUICK_STEPS = 20


@app.command("demo")
def demo_command(
    out: Annotated[Path, typer.Option(help="Where the runs, table and plot go.")] = Path("hc-retrofit-demo"),
    steps: Annotated[int, typer.Option(help="Training steps per run.")] = DEFAULT_STEPS,
    quick: Annotated[bool, typer.Option("--quick", help=f"{QUICK_STEPS} steps and small evals: a smoke test.")] = False,
    variants: Annotated[str, typer.Option(help="Comma-separated HC variants to compare with plain.")] = "mhc",
    streams: Annotated[int, typer.Option(help="HC streams.")] = 4,
    seeds: Annotated[str, typer.Option(help="Seeds (data order), comma-separated.")] = "0",
    threads: Annotated[int, typer.Option(min=1, help="torch CPU threads (1 is fastest for this small model).")] = 1,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No live progress bar.")] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an earlier demo's results in --out (only its own files).")
    ] = False,
) -> None:
    """Offline demo: the pretrained stories260K retrofitted, verified exact, continued on Shakespeare vs plain at fair LRs."""
    import time

    from hc_retrofit.cli.compare import print_table
    from hc_retrofit.option_lists import parse_list

    seed_list = parse_list(seeds, int, "--seeds")  # before the heavy imports: a bad flag fails fast
    import torch
    from rich.console import Console

    from hc_retrofit.demo import run_demo

    quiet_library_progress()
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    result = run_demo(
        out,
        steps=QUICK_STEPS if quick and steps == DEFAULT_STEPS else steps,
        quick=quick,
        variants=tuple(v.strip() for v in variants.split(",") if v.strip()),
        streams=streams,
        seeds=seed_list,
        overwrite=overwrite,
        progress=not no_progress,
        log=lambda line: typer.echo(line, err=True),
    )
    console = Console()
    print_table(result.compare, console)
    console.print(f"total time: {time.perf_counter() - t0:.0f} s")
