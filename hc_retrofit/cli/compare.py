"""`hc-retrofit compare`: plain vs HC variants over seeds, each arm at its own best LR.

A thin layer over :func:`hc_retrofit.compare.run_compare`: the options become a comparison
(:func:`hc_retrofit.compare.options.spec_from_options`); it prints one line per trial and the
final table (or ``--json``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from hc_retrofit.cli.core import app, quiet_library_progress


@app.command("compare")
def compare_command(
    model: Annotated[str, typer.Argument(help="Plain model (dir or Hub id): every arm starts from it.")],
    data: Annotated[str, typer.Option(help=".txt/.jsonl/.parquet/.csv file, directory or dataset id.")],
    out: Annotated[Path, typer.Option(help="Comparison dir: runs/, results.json, compare.png.")] = Path(
        "hc-retrofit-compare"
    ),
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML train recipe for every run.")] = None,
    variants: Annotated[str, typer.Option(help="HC variants to compare with plain, comma-separated.")] = "mhc",
    streams: Annotated[str, typer.Option(help="HC stream counts, comma-separated (each x each variant).")] = "4",
    seeds: Annotated[str, typer.Option(help="Seeds (data order), comma-separated.")] = "0",
    lr_grid: Annotated[str, typer.Option(help="Base LRs tried per arm, comma-separated.")] = "1e-4,3e-4,1e-3",
    hc_lr_multiplier_grid: Annotated[
        str, typer.Option(help="HC LR multipliers tried per HC arm (x each LR), comma-separated.")
    ] = "10",
    tune_seeds: Annotated[
        int | None,
        typer.Option(help="Choose the LRs on the first K seeds; the others run only the chosen ones (default: all)."),
    ] = None,
    validation_fraction: Annotated[float, typer.Option(help="Fraction of blocks that chooses each arm's LR.")] = 0.05,
    heldout_fraction: Annotated[float, typer.Option(help="Last fraction of blocks, reported.")] = 0.05,
    max_steps: Annotated[int | None, typer.Option(help="Optimiser steps per run.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Sequences per micro-batch.")] = None,
    block_size: Annotated[int | None, typer.Option(help="Tokens per packed sequence.")] = None,
    warmup_steps: Annotated[int | None, typer.Option(help="Linear LR warmup steps, then cosine.")] = None,
    eval_every: Annotated[int | None, typer.Option(help="Validation + held-out eval every N steps.")] = None,
    save_every: Annotated[int | None, typer.Option(help="Checkpoint every N steps (resume granularity).")] = None,
    compile: Annotated[
        bool, typer.Option("--compile", help="torch.compile each decoder layer in every run (regional).")
    ] = False,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Any other train setting, KEY=VALUE (repeatable).")
    ] = None,
    cache_dir: Annotated[str | None, typer.Option(help="datasets cache dir for the tokenised data.")] = None,
    threads: Annotated[
        int | None, typer.Option(min=1, help="torch CPU threads (default: the cores this process may use).")
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Delete the comparison in --out first (only its own files).")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the result as JSON (progress goes to stderr).")
    ] = False,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No live progress bars.")] = False,
) -> None:
    """Plain (--no-hc) vs HC variants over seeds, each arm at its best LR (chosen on validation, reported held-out)."""
    options = dict(locals())
    from rich.console import Console

    from hc_retrofit.compare import run_compare
    from hc_retrofit.compare.options import spec_from_options

    quiet_library_progress()  # the command's own lines and bars own the screen
    for name in ("overwrite", "as_json", "no_progress"):
        options.pop(name)
    recipe, settings = options.pop("config"), options.pop("set_")
    options.update(out=str(out), recipe=str(recipe) if recipe else None, settings=settings)
    spec = spec_from_options(**options)
    result = run_compare(
        spec, overwrite=overwrite, progress=not no_progress, log=lambda line: typer.echo(line, err=True)
    )
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
        return
    print_table(result, Console())


def print_table(result: object, console: object) -> None:
    """The per-arm table: best setting, validation and held-out loss, gain over plain, speed.

    As records instead of a table when the terminal is too narrow for it (:func:`print_fitted`).
    """
    from hc_retrofit.cli.tables import print_fitted

    def signed(value: float | None) -> str:
        return "-" if value is None else f"{value:+.4f}"

    headers = ("arm", "LR", "HC x", "val loss", "held-out", "gain", "gain sd", "min gain", "tok/s", "train s")
    rows = [
        (
            s.arm,
            f"{s.lr:g}",
            "-" if s.hc_lr_multiplier is None else f"{s.hc_lr_multiplier:g}",
            f"{s.validation_loss:.4f}",
            f"{s.heldout_loss:.4f}",
            signed(s.gain_mean),
            "-" if s.gain_std is None else f"{s.gain_std:.4f}",
            signed(s.gain_min),
            f"{s.tokens_per_s:,.0f}",
            f"{s.train_seconds:,.0f}",
        )
        for s in result.arms
    ]
    title = "each arm at its best LR (chosen on validation; loss on the held-out split)"
    print_fitted(console, title, headers, rows, right=headers[1:])
    seeds = len(result.arms[0].heldout_by_seed)
    console.print(
        f"{seeds} seed(s); gain = plain held-out loss - arm held-out loss, per seed, each arm at its own best LR "
        "(positive: HC better)"
    )
    console.print(f"results: {Path(result.out_dir) / 'results.json'}\nplot: {result.plot}")
