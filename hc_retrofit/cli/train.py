"""`hc-retrofit train`: continued pretraining (a thin layer over :func:`hc_retrofit.train.train`).

Every flag is a :class:`~hc_retrofit.train.TrainConfig` key; a flag left out keeps the recipe's
(``--config``) value, then the default. Runs under ``accelerate launch -m hc_retrofit train ...``
unchanged (DDP, FSDP, multi-CPU).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from hc_retrofit.cli.core import app, quiet_library_progress

if TYPE_CHECKING:
    from hc_retrofit.train import TrainResult


@app.command("train")
def train_command(
    model: Annotated[
        str | None,
        typer.Argument(help="Converted checkpoint dir, or a plain model (dir or Hub id) to convert on the fly."),
    ] = None,
    data: Annotated[str | None, typer.Option(help=".txt/.jsonl/.parquet/.csv file, directory or dataset id.")] = None,
    out: Annotated[
        str | None, typer.Option(help="Run directory: checkpoints, metrics.jsonl, loss.png, final/.")
    ] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML recipe; flags override it.")] = None,
    streams: Annotated[int | None, typer.Option(help="HC streams when converting on the fly (default 4).")] = None,
    variant: Annotated[str | None, typer.Option(help="static | dynamic | mhc, when converting (default mhc).")] = None,
    no_hc: Annotated[bool, typer.Option("--no-hc", help="Train the plain model (ablation), same pipeline.")] = False,
    max_steps: Annotated[int | None, typer.Option(help="Optimiser steps (default 1000).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Sequences per process per micro-batch (default 8).")] = None,
    block_size: Annotated[int | None, typer.Option(help="Tokens per packed sequence (default 256).")] = None,
    grad_accum: Annotated[int | None, typer.Option(help="Micro-batches per optimiser step (default 1).")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate of the base parameters (default 3e-4).")] = None,
    hc_lr_multiplier: Annotated[float | None, typer.Option(help="HC parameters' LR = lr x this (default 10).")] = None,
    hc_warmup_steps: Annotated[
        int | None, typer.Option(help="First N steps train only HC parameters (base frozen) (default 0).")
    ] = None,
    warmup_steps: Annotated[int | None, typer.Option(help="Linear LR warmup steps, then cosine (default 50).")] = None,
    weight_decay: Annotated[
        float | None, typer.Option(help="AdamW weight decay of base matrices (default 0.1).")
    ] = None,
    max_grad_norm: Annotated[float | None, typer.Option(help="Gradient clipping norm, 0 = off (default 1.0).")] = None,
    grad_checkpointing: Annotated[bool, typer.Option("--grad-checkpointing", help="Recompute activations.")] = False,
    compile: Annotated[
        bool, typer.Option("--compile", help="torch.compile each decoder layer (regional; fuses HC on GPU).")
    ] = False,
    mixed_precision: Annotated[
        str | None, typer.Option(help="auto | no | bf16 | fp16; auto = bf16 on a GPU that has it (default auto).")
    ] = None,
    save_every: Annotated[
        int | None, typer.Option(help="Checkpoint every N steps, 0 = final only (default 200).")
    ] = None,
    eval_every: Annotated[int | None, typer.Option(help="Held-out eval every N steps (default 100).")] = None,
    eval_fraction: Annotated[
        float | None, typer.Option(help="Held-out fraction of the packed data (default 0.05).")
    ] = None,
    heldout_fraction: Annotated[
        float | None, typer.Option(help="A second held-out split after the eval one, 0 = none (default 0).")
    ] = None,
    eval_batches: Annotated[int | None, typer.Option(help="Max eval batches per process (default 50).")] = None,
    text_column: Annotated[
        str | None, typer.Option(help="Text column of jsonl/parquet/dataset data (default text).")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the data order (default 0).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoint in --out.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Delete an existing --out first.")] = False,
    report_to: Annotated[
        list[str] | None, typer.Option(help="Tracker(s): tensorboard, wandb, all (repeatable).")
    ] = None,
    cache_dir: Annotated[str | None, typer.Option(help="datasets cache dir for the tokenised data.")] = None,
    threads: Annotated[
        int | None,
        typer.Option(min=1, help="torch CPU threads per process (default: the cores / the processes)."),
    ] = None,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No live progress bar.")] = False,
) -> None:
    """Continued pretraining of a converted (or, with --no-hc, plain) model with accelerate."""
    flags = dict(locals())
    from hc_retrofit.train import train
    from hc_retrofit.train.recipe import command_line_config

    quiet_library_progress()
    progress = False if flags.pop("no_progress") else None
    result = train(command_line_config(flags.pop("config"), progress=progress, **flags))
    from accelerate import PartialState

    if PartialState().is_main_process:  # under accelerate launch, one report
        _report(result)


def _report(result: TrainResult) -> None:
    """The run's outcome in three lines: eval loss before and after, where the model, metrics and plot are."""
    from rich.console import Console

    console = Console()
    if result.final_eval_loss is not None and result.initial_eval_loss is not None:
        console.print(
            f"eval loss {result.initial_eval_loss:.4f} -> {result.final_eval_loss:.4f} "
            f"over {result.steps - result.start_step} steps; {result.tokens_per_s:,.0f} tok/s"
        )
    console.print(f"model: {result.final_dir}\nmetrics: {Path(result.out_dir) / 'metrics.jsonl'}\nplot: {result.plot}")
