"""``hc-retrofit serve DIR``: start vLLM's OpenAI-compatible server on a converted checkpoint."""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Annotated

import typer

from hc_retrofit.cli.core import app


@app.command(
    "serve",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def serve_command(
    ctx: typer.Context,
    directory: Annotated[Path, typer.Argument(metavar="DIR", help="A converted checkpoint directory.")],
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on.")] = 8000,
    dtype: Annotated[
        str, typer.Option("--dtype", help="Weights dtype (auto: the checkpoint's; HC coefficients stay float32).")
    ] = "auto",
    vllm: Annotated[
        str | None,
        typer.Option("--vllm", help="The vllm executable or its environment (default: $HC_RETROFIT_VLLM, then PATH)."),
    ] = None,
    print_only: Annotated[bool, typer.Option("--print", help="Print the command instead of running it.")] = False,
) -> None:
    """Serve DIR with vLLM (OpenAI-compatible HTTP): vllm serve DIR --model-impl transformers --trust-remote-code.

    Options this command does not have go to vllm serve unchanged (e.g. --max-model-len 4096).
    """
    from hc_retrofit.serve import check_servable, find_vllm, vllm_command

    path = check_servable(directory)
    command = vllm_command(path, vllm=find_vllm(vllm), host=host, port=port, dtype=dtype, extra=list(ctx.args))
    if print_only:
        typer.echo(shlex.join(command))
        return
    typer.echo(f"starting: {shlex.join(command)}", err=True)
    os.execv(command[0], command)  # vllm owns the process from here: signals, exit code, logs
