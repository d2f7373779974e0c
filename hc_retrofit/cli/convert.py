"""``hc-retrofit convert MODEL --out DIR``: retrofit a checkpoint and save it so that it loads anywhere."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from hc_retrofit.cli.core import app, console, err_console, quiet_library_progress
from hc_retrofit.modeling.config import VARIANTS, HCConfig

if TYPE_CHECKING:
    from hc_retrofit.streaming import StreamSummary


@app.command("convert")
def convert_command(
    model: Annotated[
        str, typer.Argument(metavar="MODEL", help="Base model: a local checkpoint directory or a Hub id (org/name).")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory to write the converted checkpoint to.")],
    streams: Annotated[int, typer.Option("--streams", "-n", help="Number of residual streams (>= 2).")] = 4,
    variant: Annotated[
        str, typer.Option("--variant", help=f"Hyper-connection variant: {', '.join(VARIANTS)}.")
    ] = "mhc",
    dtype: Annotated[
        str, typer.Option("--dtype", help="Weights dtype: auto, float32, bfloat16, float16 (auto = the checkpoint's).")
    ] = "auto",
    revision: Annotated[str | None, typer.Option("--revision", help="Hub branch, tag or commit of MODEL.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace --out if it exists.")] = False,
    trust_remote_code: Annotated[
        bool, typer.Option("--trust-remote-code", help="Allow MODEL's own modeling code.")
    ] = False,
    stream: Annotated[
        bool,
        typer.Option(
            "--stream/--in-memory",
            help="Stream: copy the base shards and add the HC tensors without loading the model "
            "(falls back to in-memory, saying why, when MODEL is not a safetensors checkpoint of a known family).",
        ),
    ] = True,
    link: Annotated[
        bool, typer.Option("--link", help="When streaming, hard link the base shards instead of copying them.")
    ] = False,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify/--no-verify",
            help="After streaming, run `verify` on the result before it is moved into place "
            "(one model in float32 in memory when it fits, else layer by layer).",
        ),
    ] = True,
) -> None:
    """Add hyper-connections to MODEL and save the result to --out (atomically: all or nothing).

    The converted model computes exactly the same function as MODEL; check it with
    `hc-retrofit verify DIR`. The checkpoint loads with hc_retrofit.load_converted(DIR), or with
    plain transformers via AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True).
    """
    settings = HCConfig(num_streams=streams, variant=variant)  # bad settings fail before any loading
    from hc_retrofit import ownership
    from hc_retrofit.outputs import check_output_dir

    target = check_output_dir(out, overwrite=overwrite, inputs=[model])
    with ownership.output_lock(target):  # a second writer of --out is refused now, not after loading
        _convert(model, out, settings, dtype, revision, overwrite, trust_remote_code, stream, link, verify)


def _convert(
    model: str,
    out: Path,
    settings: HCConfig,
    dtype: str,
    revision: str | None,
    overwrite: bool,
    trust_remote_code: bool,
    stream: bool,
    link: bool,
    verify: bool,
) -> None:
    """The command body, run while holding the lock of ``out``."""
    start = time.perf_counter()
    early = None
    if stream and dtype == "auto":  # start copying the shards now: torch and transformers import meanwhile
        from hc_retrofit.shard_copy import start_copy

        early = start_copy(model, out, overwrite=overwrite, link=link)
    try:
        from hc_retrofit.conversion import convert_checkpoint  # torch + transformers: only when a command runs
        from hc_retrofit.dtypes import parse_dtype
        from hc_retrofit.streaming import CannotStream, stream_convert

        quiet_library_progress()
        parse_dtype(dtype)
    except BaseException:
        if early is not None:
            early.abort()
        raise
    with err_console.status("converting", spinner="dots") as status:

        def progress(message: str) -> None:
            status.update(message)
            err_console.print(f"[dim]{message}[/dim]")

        common = dict(revision=revision, dtype=dtype, overwrite=overwrite, trust_remote_code=trust_remote_code)
        summary = None
        how = "in memory"
        if stream:
            try:
                summary = stream_convert(
                    model,
                    out,
                    settings,
                    link=link,
                    verify=verify,
                    progress=progress,
                    early=early,
                    **common,
                )
                how = _streamed(summary)
            except CannotStream as why:
                err_console.print(f"cannot stream {model}: {why}; converting in memory instead")
        if summary is None:
            summary = convert_checkpoint(model, out, settings, progress=progress, **common)
    table = Table(title="converted", show_header=False, box=None)
    table.add_row("base model", summary.base_model)
    table.add_row("family", f"{summary.model_type} ({summary.block_kind} blocks)")
    table.add_row("layers patched", f"{summary.layers} ({summary.sites} hyper-connection sites)")
    table.add_row("hyper-connections", f"{summary.variant}, {summary.num_streams} streams")
    table.add_row(
        "parameters added",
        f"{summary.added_parameters:,} ({summary.added_percent:.3f}% of {summary.base_parameters:,})",
    )
    table.add_row("tokenizer", "saved" if summary.has_tokenizer else "none found (not saved)")
    table.add_row("conversion", how)
    table.add_row("output", summary.out_dir)
    table.add_row("time", f"{time.perf_counter() - start:.1f} s")
    split = getattr(summary, "timings", None)
    if split:  # the copy runs in the background from the start: "waited" is what it added
        parts = [f"{k} {split[k]:.1f}" for k in ("plan", "files") if k in split]
        parts.append(f"copy {split.get('copy', 0):.1f} (waited {split.get('copy wait', 0):.1f})")
        if "verify" in split:
            parts.append(f"verify {split['verify']:.1f}")
        table.add_row("of which", ", ".join(parts) + " s")
    console.print(table)


def _streamed(summary: StreamSummary) -> str:
    """``streamed (2 shards copied), verified exact`` and the like."""
    parts = []
    copied = summary.shards - summary.linked_shards - summary.reencoded_shards
    for count, what in (
        (summary.linked_shards, "hard linked"),
        (copied, "copied"),
        (summary.reencoded_shards, "re-encoded"),
    ):
        if count:
            parts.append(f"{count} {what}")
    shards = f"{summary.shards} base shard{'s' if summary.shards != 1 else ''}: {', '.join(parts)}"
    if summary.verified:
        checked = "verified exact" + (" (layer by layer)" if summary.verify_loading == "layer by layer" else "")
    else:
        checked = "not verified (--no-verify)"
    return f"streamed ({shards}), {checked}"
