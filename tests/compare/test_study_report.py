"""`scripts/study_report.py`: README study tables and plot regenerated from finished compare dirs."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

from hc_retrofit.compare import run_compare

from .conftest import tiny_spec

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "study_report.py"


def _script():
    spec = importlib.util.spec_from_file_location("study_report", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def study(plain_model, corpus, cache_dir, tmp_path_factory) -> Path:
    """Two comparisons as the study has them: the main one, and one with HC-only warm-up (plain shared)."""
    runs = tmp_path_factory.mktemp("runs")
    run_compare(tiny_spec(runs / "study", plain_model, corpus, cache_dir, seeds=(0, 1), tune_seeds=1), progress=False)
    warm = tiny_spec(runs / "study-warm", plain_model, corpus, cache_dir, seeds=(0, 1), tune_seeds=1)
    warm.train["hc_warmup_steps"] = 2
    run_compare(warm, progress=False)
    return runs


def test_readme_blocks_are_regenerated_from_the_compare_dirs(study, tmp_path):
    module = _script()
    readme = tmp_path / "README.md"
    readme.write_text(
        "intro\n<!-- study-report grid study -->\nstale\n<!-- /study-report -->\n"
        "<!-- study-report arms study study-warm -->\n<!-- /study-report -->\n"
        "<!-- study-report plot docs/study.png study study-warm -->\n![plot](docs/study.png)\n<!-- /study-report -->\n"
    )
    args = ["--runs", str(study), "--readme", str(readme)]
    assert module.main([*args, "--check"]) == 1  # stale
    assert module.main(args) == 0
    assert module.main([*args, "--check"]) == 0
    text = readme.read_text()
    assert "stale" not in text and text.startswith("intro\n") and "![plot](docs/study.png)" in text
    assert (tmp_path / "docs" / "study.png").stat().st_size > 5000

    results = {name: json.loads((study / name / "results.json").read_text()) for name in ("study", "study-warm")}
    rows = [line for line in text.split("\n") if line.startswith("| ")]
    # grid: one row per (arm, LR) of the main comparison; the chosen setting in bold
    chosen = [r for r in rows if "chosen" in r]
    assert len(chosen) == 2 and any(r.startswith("| mHC n=2 | ") for r in chosen)
    # arms: plain once (both comparisons ran the same plain runs), then each HC arm with its label
    plain_rows = [r for r in rows if r.startswith("| plain | 3e-4, 1e-2 |")]
    assert len(plain_rows) == 1
    for name, label in (("study", "| mHC n=2 |"), ("study-warm", "| mHC n=2, HC-only warm-up 2 steps |")):
        (row,) = [r for r in rows if r.startswith(label) and "±" in r]
        hc = results[name]["arms"][1]
        assert f"{hc['gain_mean']:+.4f} ± {hc['gain_std']:.4f}" in row
        assert " / ".join(f"{v:.4f}" for v in hc["heldout_by_seed"].values()) in row


def test_a_block_without_its_end_or_an_unfinished_comparison_is_an_error(study, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("<!-- study-report grid study -->\n| old |\n")
    with pytest.raises(SystemExit, match="no <!-- /study-report -->"):
        _script().main(["--runs", str(study), "--readme", str(readme)])
    shutil.copytree(study / "study", tmp_path / "runs" / "study")
    next((tmp_path / "runs" / "study" / "runs").glob("mhc-n2/*/seed1/summary.json")).unlink()
    readme.write_text("<!-- study-report arms study -->\n<!-- /study-report -->\n")
    with pytest.raises(SystemExit, match=r"study is not finished \(1 run\(s\) missing\)"):
        _script().main(["--runs", str(tmp_path / "runs"), "--readme", str(readme)])
    assert readme.read_text() == "<!-- study-report arms study -->\n<!-- /study-report -->\n"
