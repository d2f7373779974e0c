"""``hc-retrofit architectures``: the supported model families and how their blocks are retrofitted."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from hc_retrofit.cli.app import app, console
from hc_retrofit.families import FAMILIES, supported_model_types


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
