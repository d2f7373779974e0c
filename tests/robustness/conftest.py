"""Fixtures of the robustness catalogue: the CLI fixtures (offline Hub, runner, tiny checkpoints) and helpers."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cli.conftest import _offline, base_dir, cli, converted_dir  # noqa: F401  (fixtures)


def one_line_error(result: object) -> str:
    """The CLI's error line; fails the test on a traceback or a message of more than one line."""
    output = getattr(result, "output", "")
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, output
    return lines[0]


def tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its content (to show that nothing changed)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    """A small text corpus in the tiny tokenizer's words."""
    from hc_retrofit.equivalence import PROBE_TEXTS

    path = tmp_path / "data.txt"
    path.write_text("\n\n".join(PROBE_TEXTS * 20), encoding="utf-8")
    return path


TRAIN = ["--block-size", "16", "--batch-size", "2", "--max-steps", "2", "--eval-every", "0", "--no-progress"]
"""The smallest train run (seconds)."""
