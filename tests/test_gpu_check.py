"""``bench/gpu_check.sh --dry-run`` lists steps that exist: every test file with CUDA tests, and
benchmark commands whose every option the script accepts (a typo would otherwise surface only on a
borrowed GPU)."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def dry_run() -> list[list[str]]:
    done = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu_check.sh"), "--dry-run"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return [shlex.split(line) for line in done.stdout.splitlines() if line.strip()]


def test_dry_run_lists_the_cuda_tests_and_benchmarks_with_options_they_accept():
    steps = dry_run()
    assert steps[0][:3] == ["python", "-m", "pytest"] and "cuda" in steps[0]
    marked = {
        path.relative_to(REPO).as_posix()
        for path in (REPO / "tests").rglob("test_*.py")
        if "mark.cuda" in path.read_text(encoding="utf-8") and path.name != "test_gpu_check.py"
    }
    assert marked and marked == {word for word in steps[0] if word.startswith("tests/")}  # every CUDA test, by file
    benches = [s for s in steps[1:] if s[1].startswith("bench/")]
    assert {Path(s[1]).name for s in benches} >= {"layer.py", "train_step.py", "decode.py", "summary.py"}
    helps: dict[Path, str] = {}
    for step in benches:
        script = REPO / step[1]
        assert script.is_file(), step
        if script not in helps:
            shown = subprocess.run(
                [sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120, cwd=REPO
            )
            assert shown.returncode == 0, shown.stderr
            helps[script] = shown.stdout
        for word in step[2:]:
            if word.startswith("--"):
                assert word in helps[script], f"{script.name} has no option {word}"
        assert ("--device" in step) or script.name == "summary.py"
