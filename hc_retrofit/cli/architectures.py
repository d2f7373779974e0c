"""``hc-retrofit architectures``: the supported model families and how their blocks are retrofitted."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from hc_retrofit.cli.app import app, console
from hc_retrofit.families import FAMILIES, supported_model_types


def describe_families() -> list[dict[str, str]]:
    """One row per supported ``model_type``: its layer list and block kind(s)."""
    rows = []
    for model_type in supported_model_types():
        family = FAMILIES[model_type]
        kind = family.block.kind if not callable(family.block) else "depends on config (parallel or sequential)"
        sites = "" if callable(family.block) else str(len(family.block.sites) or 1)
        rows.append({"model_type": model_type, "layers": family.layers, "block": kind, "sites_per_layer": sites})
    return rows


@app.command("architectures")
def architectures_command(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List the supported model families (config.model_type) and their block kind."""
    rows = describe_families()
    if as_json:
        console.print_json(json.dumps(rows))
        return
    table = Table(title="supported architectures")
    for column in ("model_type", "layers", "block", "sites per layer"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["model_type"], row["layers"], row["block"], row["sites_per_layer"])
    console.print(table)
