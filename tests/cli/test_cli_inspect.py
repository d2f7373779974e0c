"""`hc-retrofit inspect`: coefficients per site, stream divergence (0 at init, > 0 after training), plots."""

from __future__ import annotations

import json
from pathlib import Path


def test_inspect_table(cli, converted_dir: Path, monkeypatch) -> None:
    from hc_retrofit.cli import core as app

    monkeypatch.setattr(app.console, "width", 200)
    result = cli("inspect", converted_dir)
    assert result.exit_code == 0, result.output
    assert "width a" in result.output and "stream divergence" in result.output
    assert "R to doubly stoch." in result.output and "…" not in result.output


def test_inspect_fits_80_columns(cli, converted_dir: Path, monkeypatch) -> None:
    from hc_retrofit.cli import core as app

    monkeypatch.setattr(app.console, "width", 80)
    result = cli("inspect", converted_dir)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(len(line) for line in lines) <= 80 and "…" not in result.output
    assert sum(line.startswith("layer ") for line in lines) == 6  # one record per site
    assert "width a [" in result.output and "depth b [" in result.output and "R to doubly stoch. " in result.output


def test_inspect_plot_without_matplotlib_fails_before_the_work(cli, converted_dir: Path, tmp_path, monkeypatch) -> None:
    import sys

    import hc_retrofit.inspection

    def never(*args, **kwargs):
        raise AssertionError("the checkpoint was loaded before the missing extra was reported")

    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setattr(hc_retrofit.inspection, "inspect_checkpoint", never)
    result = cli("inspect", converted_dir, "--plot", tmp_path / "hc.png")
    assert result.exit_code == 1 and result.output.startswith("error: ") and "hc-retrofit[plot]" in result.output
    assert result.output.count("\n") == 1


def test_inspect_json_at_init_and_after_training(cli, converted_dir: Path, trained_dir: Path) -> None:
    fresh = json.loads(cli("inspect", converted_dir, "--json").stdout)
    assert len(fresh["sites"]) == 6 and fresh["variant"] == "mhc"
    for site in fresh["sites"]:
        assert abs(sum(site["width"]) - 1) < 1e-5 and all(abs(b - 1) < 1e-6 for b in site["depth"])
        assert site["residual_doubly_stochastic_distance"] < 1e-5
        assert site["residual_identity_distance"] > 0  # mHC starts from a mixing R, not the identity
    assert len(fresh["stream_divergence"]) == 2 and max(fresh["stream_divergence"]) < 1e-5
    trained = json.loads(cli("inspect", trained_dir, "--json").stdout)
    assert min(trained["stream_divergence"]) > 1e-4
    assert any(s["width"] != f["width"] for s, f in zip(trained["sites"], fresh["sites"], strict=True))


def test_inspect_plot(cli, converted_dir: Path, tmp_path: Path) -> None:
    plot = tmp_path / "plots" / "hc.png"
    result = cli("inspect", converted_dir, "--plot", plot)
    assert result.exit_code == 0, result.output
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_inspect_bad_input(cli, base_dir: Path) -> None:
    result = cli("inspect", base_dir)
    assert result.exit_code == 1 and result.output.startswith("error: ") and "not a converted" in result.output


def test_inspect_names_the_layers_of_the_divergence(cli, converted_dir: Path, trained_dir: Path) -> None:
    fresh = " ".join(cli("inspect", converted_dir).output.split())
    assert "stream divergence: 0 after every layer" in fresh and "e-0" in fresh  # noise shown as rounding, not data
    trained = " ".join(cli("inspect", trained_dir).output.split())
    assert "after layer 0: " in trained and ", layer 1: " in trained and "layer 2 averages the streams" in trained
