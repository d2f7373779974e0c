"""``hc-retrofit architectures``: the hand-written families, or (``--check``) coverage measured on
every model type of the installed transformers for a task (causal LM by default; :mod:`hc_retrofit.sweep`)."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from hc_retrofit.cli.core import app, console, err_console, fail
from hc_retrofit.modeling.families import FAMILIES, supported_model_types


class _EveryFlag:
    """A stand-in config whose every attribute is ``value``: shows the blocks a config-dependent family picks."""

    def __init__(self, value: bool) -> None:
        self._value = value

    def __getattr__(self, name: str) -> bool:
        return self._value


def describe_families() -> list[dict[str, str]]:
    """One row per supported ``model_type``: its layer list, block kind(s) and sites per layer."""
    rows = []
    for model_type in supported_model_types():
        family = FAMILIES[model_type]
        blocks = [family.block] if not callable(family.block) else [family.block(_EveryFlag(v)) for v in (True, False)]
        kinds = dict.fromkeys(b.kind for b in blocks)
        sites = dict.fromkeys(str(len(b.sites) or 1) for b in blocks)
        kind = " | ".join(kinds) + (" (by config)" if len(kinds) > 1 else "")
        rows.append(
            {"model_type": model_type, "layers": family.layers, "block": kind, "sites_per_layer": " | ".join(sites)}
        )
    return rows


@app.command("architectures")
def architectures_command(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    check: Annotated[
        bool,
        typer.Option(
            "--check",
            help="Build every causal-LM type of the installed transformers as a tiny random model, convert it "
            "with each variant and report exact / refused (why) / could not build tiny. Slow: minutes.",
        ),
    ] = False,
    types: Annotated[
        str | None, typer.Option("--types", help="With --check: only these model types (comma-separated).")
    ] = None,
    as_markdown: Annotated[
        bool, typer.Option("--markdown", help="With --check: print the README's supported-architectures table.")
    ] = False,
    timeout: Annotated[
        float, typer.Option("--timeout", help="With --check: seconds allowed per model type.", min=1.0)
    ] = 300.0,
    max_memory: Annotated[
        float,
        typer.Option("--max-memory", help="With --check: GiB of address space the sweep may use.", min=1.0),
    ] = 8.0,
    task: Annotated[
        str,
        typer.Option(
            "--task",
            help="With --check: which models to build: causal-lm (AutoModelForCausalLM), masked-lm, "
            "image-classification, base (AutoModel).",
        ),
    ] = "causal-lm",
) -> None:
    """List the hand-written model families (config.model_type) and their block kind; any other type
    is discovered from the model. --check measures which types convert exactly."""
    if check:
        _check(types, as_json=as_json, as_markdown=as_markdown, timeout=timeout, max_memory=max_memory, task=task)
        return
    if types is not None or as_markdown or task != "causal-lm":
        fail("--types, --task and --markdown go with --check")
    rows = describe_families()
    if as_json:
        console.print_json(json.dumps(rows))
        return
    table = Table(title="hand-written families (any other type: discovered from the model and proven)")
    for column in ("model_type", "layers", "block", "sites per layer"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["model_type"], row["layers"], row["block"], row["sites_per_layer"])
    console.print(table)


def _check(
    types: str | None, *, as_json: bool, as_markdown: bool, timeout: float, max_memory: float, task: str
) -> None:
    from hc_retrofit import sweep
    from hc_retrofit.modeling.config import VARIANTS
    from hc_retrofit.tasks import TASKS

    if task not in TASKS:
        fail(f"--task: unknown task {task!r}; choose one of {', '.join(TASKS)}")
    label = sweep.TASK_LABELS[task]
    known = sweep.task_types(task)
    chosen = None
    if types is not None:
        chosen = [t.strip() for t in types.split(",") if t.strip()]
        unknown = [t for t in chosen if t not in known]
        if unknown or not chosen:
            fail(f"--types: not a {label} model type of this transformers: {', '.join(unknown) or repr(types)}")
    total = len(chosen if chosen is not None else known)
    done = [0]

    def progress(row: sweep.SweepRow) -> None:
        done[0] += 1
        err_console.print(f"[dim]{done[0]}/{total} {row.model_type}: {row.outcome} ({row.seconds:.1f} s)[/dim]")

    rows = sweep.sweep(chosen, progress=progress, timeout=timeout, max_memory_gb=max_memory, task=task)
    summary = sweep.coverage(rows)
    if as_json:
        console.print_json(json.dumps({"task": task, "coverage": summary, "rows": [r.to_dict() for r in rows]}))
    elif as_markdown:
        typer.echo(sweep.markdown(rows, task=task), nl=False)
    else:
        table = Table(title=f"{label} types, tiny random models, {' + '.join(VARIANTS)}")
        # a column per variant only when some type's variants disagree
        split = [v for v in VARIANTS if any(len(set(r.variants.values())) > 1 for r in rows)]
        for column in ("model_type", "outcome", *split, "structure kept, or why not"):
            table.add_column(column, overflow="fold")
        for row in rows:
            per_variant = [row.variants.get(v, "-") for v in split]
            table.add_row(row.model_type, row.outcome, *per_variant, escape(row.detail))
        console.print(table)
        console.print(
            f"exact {summary['exact']} of {summary['built']} built ({100 * summary['exact_share']:.1f}%), "
            f"refused {summary['refused']}, error {summary['error']}, timeout {summary['timeout']}, "
            f"could not build tiny {summary['no tiny']}"
        )
    if summary["error"]:
        raise typer.Exit(1)  # a crash instead of a clear refusal is a bug
