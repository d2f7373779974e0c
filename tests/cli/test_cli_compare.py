"""`hc-retrofit compare` through the CLI: table, --json, --set, one-line errors."""

from __future__ import annotations

import json

from tests.compare.conftest import plain_model, tiny_spec  # noqa: F401  (fixture)
from tests.train.conftest import _one_thread, cache_dir, corpus, tokenizer  # noqa: F401  (fixtures)

SMALL = [
    "--variants", "mhc", "--streams", "2", "--seeds", "0", "--lr-grid", "1e-2",
    "--validation-fraction", "0.1", "--heldout-fraction", "0.1", "--max-steps", "3", "--batch-size", "2",
    "--block-size", "32", "--warmup-steps", "1", "--eval-every", "0", "--save-every", "0",
    "--set", "eval_batches=2", "--threads", "1", "--no-progress",
]  # fmt: skip


def test_compare_table_then_json_from_the_finished_runs(cli, plain_model, corpus, cache_dir, tmp_path, monkeypatch):  # noqa: F811
    out = tmp_path / "cmp"
    args = ["compare", plain_model, "--data", corpus, "--out", out, "--cache-dir", cache_dir, *SMALL]
    monkeypatch.setenv("COLUMNS", "80")
    from transformers.utils import logging as transformers_logging

    was_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.enable_progress_bar()  # as in a fresh process
    try:
        result = cli(*args)
    finally:
        (transformers_logging.enable_progress_bar if was_enabled else transformers_logging.disable_progress_bar)()
    assert result.exit_code == 0, result.output
    assert "Loading weights" not in result.stderr and "Writing model shards" not in result.stderr  # --no-progress
    assert "each arm at its best LR" in result.output and "arm mhc n=2" in result.output
    assert max(len(line) for line in result.stdout.splitlines()) <= 80 and "…" not in result.stdout
    assert "gain sd " in result.stdout and "min gain " in result.stdout  # every column, by name
    assert (out / "compare.png").exists()
    again = cli(*args, "--json")
    assert again.exit_code == 0, again.output
    payload = json.loads(again.stdout)
    assert [a["arm"] for a in payload["arms"]] == ["plain", "mhc n=2"]
    assert payload["arms"][1]["gain_mean"] == payload["arms"][0]["heldout_loss"] - payload["arms"][1]["heldout_loss"]
    assert "already done" in again.stderr
    summary = json.loads((out / "runs" / "plain" / "lr0.01" / "seed0" / "summary.json").read_text())
    assert summary["steps"] == 3


def test_compare_bad_input_is_one_line(cli, tmp_path):
    result = cli("compare", "m", "--data", "d", "--out", tmp_path / "x", "--lr-grid", "1e-3,abc")
    assert result.exit_code == 1
    assert result.output.strip() == "error: --lr-grid takes comma-separated floats, got '1e-3,abc'"
    result = cli("compare", "m", "--data", "d", "--out", tmp_path / "x", "--set", "seed=3")
    assert result.exit_code == 1 and "seed is set by compare per run: use --seeds" in result.output
    assert not (tmp_path / "x").exists()
