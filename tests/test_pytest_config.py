"""The test configuration in pyproject.toml: the README's test command reports, deprecations fail."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _pytest(tmp_path: Path, body: str) -> str:
    test = tmp_path / "test_one.py"
    test.write_text(body)
    config = ["-c", str(REPO / "pyproject.toml"), "-p", "no:cacheprovider", "--rootdir", str(tmp_path)]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-x", "-q", *config, str(test)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    return done.stdout


def test_the_readme_test_command_prints_the_passed_line(tmp_path: Path) -> None:
    assert "1 passed" in _pytest(tmp_path, "def test_ok():\n    pass\n")


def test_a_transformers_v6_deprecation_fails_the_test(tmp_path: Path) -> None:
    body = (
        "import warnings\n\n"
        "def test_old_name():\n"
        "    warnings.warn('`x` is deprecated and will be removed in v6. Use `y`', FutureWarning)\n"
    )
    assert "1 failed" in _pytest(tmp_path, body)
