"""`cli/tables.py`: a table when it fits the terminal, else one record per row; nothing is ever cut."""

from __future__ import annotations

import io

from rich.console import Console

from hc_retrofit.cli.tables import pack, print_fitted

HEADERS = ("arm", "LR", "HC x", "val loss", "held-out", "gain", "gain sd", "min gain", "tok/s", "train s")
ROWS = [
    ("plain", "0.001", "-", "5.1234", "5.2345", "+0.0000", "-", "+0.0000", "12,345", "120"),
    ("mhc n=4", "0.001", "10", "5.0123", "5.1234", "+0.1111", "0.0123", "+0.0988", "10,987", "135"),
]


def _render(width: int) -> str:
    console = Console(file=io.StringIO(), width=width, color_system=None)
    print_fitted(console, "each arm at its best LR", HEADERS, ROWS, right=HEADERS[1:])
    return console.file.getvalue()


def test_a_wide_terminal_gets_the_table() -> None:
    text = _render(200)
    assert "┃" in text or "│" in text
    assert all(value in text for row in ROWS for value in row)


def test_80_columns_get_records_with_every_value_and_no_line_too_long() -> None:
    text = _render(80)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "…" not in text and "│" not in text
    assert "arm mhc n=4" in lines and "arm plain" in lines
    for row in ROWS:
        for header, value in zip(HEADERS[1:], row[1:], strict=True):
            assert f"{header} {value}" in text  # each value beside its name


def test_pack_keeps_lines_within_the_width_and_never_cuts_a_field() -> None:
    fields = [f"field{i} {'x' * i}" for i in range(12)] + ["y" * 90]
    lines = pack(fields, 40)
    assert all(len(line) <= 40 for line in lines[:-1]) and lines[-1] == "  " + "y" * 90
    assert " · ".join(line.strip() for line in lines) == " · ".join(fields)
