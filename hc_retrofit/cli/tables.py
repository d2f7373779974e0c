"""Tables that fit the terminal: a rich table when it fits, else one record per row, wrapped.

A rich table narrower than its content cuts cells to ``…``, so on an 80-column terminal the
numbers a user came for (the gain of ``compare``, the coefficients of ``inspect``) disappear.
:func:`print_fitted` measures the table first; when it is wider than the console it prints each
row as a record instead: its first cell as a heading, then ``header value`` pairs packed into
indented lines no wider than the console. Nothing is cut in either layout.
"""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console
from rich.markup import escape
from rich.table import Table

SEPARATOR = " · "
INDENT = "  "


def print_fitted(
    console: Console,
    title: str,
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    right: Sequence[str] = (),
) -> None:
    """Print ``rows`` under ``headers`` as a table, or as records when the table is wider than ``console``.

    ``right``: headers of the columns aligned right in the table layout (numbers).
    """
    table = Table(title=title)
    for header in headers:
        table.add_column(header, justify="right" if header in right else "left", no_wrap=True)
    for row in rows:
        table.add_row(*row)
    unbounded = console.options.update(max_width=10_000)  # the width the table needs, not the one it gets
    if console.measure(table, options=unbounded).maximum <= console.width:
        console.print(table)
        return
    console.print(title, markup=False)
    for row in rows:
        console.print(f"{headers[0]} {row[0]}", style="bold", markup=False)
        for line in pack([f"{h} {v}" for h, v in zip(headers[1:], row[1:], strict=True)], console.width):
            console.print(escape(line), soft_wrap=True)


def pack(fields: Sequence[str], width: int) -> list[str]:
    """``fields`` joined by :data:`SEPARATOR` into indented lines of at most ``width`` characters.

    A single field longer than a line gets a line of its own (it is never cut).
    """
    lines: list[str] = []
    current = ""
    for field in fields:
        candidate = field if not current else current + SEPARATOR + field
        if current and len(INDENT + candidate) > width:
            lines.append(INDENT + current)
            current = field
        else:
            current = candidate
    if current:
        lines.append(INDENT + current)
    return lines
