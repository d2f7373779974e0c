"""The app itself: help everywhere, `architectures`, and real processes (`python -m hc_retrofit`, console script)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hc_retrofit.modeling.families import supported_model_types
from tests.checkpoints import HUB_OFFLINE_ENV, populate_hf_cache, save_base

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("command", ["convert", "verify", "inspect", "push", "architectures"])
def test_help(cli, command: str) -> None:
    result = cli(command, "--help")
    assert result.exit_code == 0 and "Usage" in result.output


def test_main_help_and_unknown_command(cli) -> None:
    result = cli("--help")
    assert result.exit_code == 0
    for command in ("convert", "verify", "inspect", "push", "architectures"):
        assert command in result.output
    result = cli("frobnicate")
    assert result.exit_code == 2 and result.output.startswith("error: ") and "frobnicate" in result.output


def test_architectures(cli) -> None:
    rows = json.loads(cli("architectures", "--json").stdout)
    assert [r["model_type"] for r in rows] == supported_model_types()
    kinds = {r["model_type"]: r["block"] for r in rows}
    assert kinds["llama"] == "sequential" and kinds["gemma2"] == "sandwich" and kinds["opt"] == "layer"
    assert "llama" in cli("architectures").output


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(HUB_OFFLINE_ENV, HF_HOME=str(tmp_path / "hf_home"), MPLBACKEND="Agg", **extra)
    return env


def test_python_m_through_a_populated_hf_cache(cli, tmp_path: Path) -> None:
    """A real process converts a Hub id from the (offline) cache and fails cleanly on bad input; verify finds the base."""
    cache = tmp_path / "hub-cache"
    populate_hf_cache(cache, "tiny-org/tiny-llama", save_base("llama-gqa-untied", tmp_path / "src"))
    env = _env(tmp_path, HF_HUB_CACHE=str(cache))
    run = [sys.executable, "-m", "hc_retrofit"]
    out = tmp_path / "converted"
    done = subprocess.run(
        [*run, "convert", "tiny-org/tiny-llama", "--out", out, "--variant", "static"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((out / "config.json").read_text())["hc_retrofit_base"] == "tiny-org/tiny-llama"
    import huggingface_hub.constants

    with pytest.MonkeyPatch.context() as mp:  # verify resolves the recorded Hub id through the same cache
        mp.setenv("HF_HUB_CACHE", str(cache))
        mp.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
        result = cli("verify", out, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["equivalent"] is True
    done = subprocess.run(
        [*run, "convert", "tiny-org/absent", "--out", tmp_path / "x"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert [line for line in done.stderr.splitlines() if line.startswith("error: ")] == [
        done.stderr.strip().splitlines()[-1]
    ]
    assert not (tmp_path / "x").exists()


def test_console_script(tmp_path: Path) -> None:
    script = shutil.which("hc-retrofit")
    if script is None:
        pytest.skip("the hc-retrofit console script is not installed (pip install -e .)")
    done = subprocess.run(
        [script, "convert", "x", "--out", tmp_path / "o", "--streams", "0"],
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert done.stderr.strip() == "error: num_streams must be >= 2 (hyper-connections need several streams), got 0"


@pytest.mark.parametrize("command", ["convert", "verify", "inspect", "push", "architectures", "train", "demo", "serve"])
def test_flags_look_like_flags_in_help(cli, command: str) -> None:
    result = cli(command, "--help")
    assert result.exit_code == 0
    assert "<bool>" not in result.output and "--help" in result.output


def test_a_flag_takes_no_value(cli) -> None:
    result = cli("architectures", "--json", "true")
    assert result.exit_code == 2 and result.output.startswith("error: ") and "true" in result.output


def test_commands_silence_transformers_progress_bars(cli, base_dir: Path, tmp_path: Path) -> None:
    from transformers.utils import logging as transformers_logging

    transformers_logging.enable_progress_bar()
    result = cli("convert", base_dir, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "Loading weights" not in result.output and "Writing model shards" not in result.output
    assert not transformers_logging.is_progress_bar_enabled()


COMMANDS = ("architectures", "compare", "convert", "demo", "inspect", "push", "serve", "train", "verify")


def test_every_command_is_in_the_fast_help_test(cli) -> None:
    from hc_retrofit.cli.app import app

    assert sorted(c.name for c in app.registered_commands) == sorted(COMMANDS)


def test_help_and_argument_errors_do_not_import_the_heavy_libraries(tmp_path: Path) -> None:
    """`hc-retrofit --help` and usage errors must stay fast: torch & co. load only inside a running command."""
    heavy = ("torch", "transformers", "accelerate", "datasets", "matplotlib", "safetensors", "huggingface_hub")
    code = (
        "import sys\n"
        "import hc_retrofit, hc_retrofit.cli.app, hc_retrofit.cli.commands\n"
        "from hc_retrofit.cli.app import main\n"
        f"for argv in (['--help'], *[[c, '--help'] for c in {COMMANDS!r}], ['convert', 'x', '--bogus']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        f"print(sorted(m for m in {heavy!r} if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env=_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_convert_help_names_every_dtype(cli) -> None:
    from hc_retrofit.dtypes import DTYPES

    help_text = " ".join(cli("convert", "--help").output.split())
    assert all(name in help_text for name in DTYPES)


def test_the_package_imports_its_public_names_lazily() -> None:
    import hc_retrofit

    assert set(hc_retrofit.__all__) <= set(dir(hc_retrofit))
    for name in hc_retrofit.__all__:
        assert getattr(hc_retrofit, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = hc_retrofit.nope


@pytest.mark.parametrize(
    ("hidden", "argv", "extra"),
    [
        ("datasets", ["train", "m", "--data", "d.txt", "--out", "o"], "train"),
        ("typer", ["--help"], "cli"),
    ],
)
def test_a_missing_extra_is_one_line_naming_it(tmp_path: Path, hidden: str, argv: list[str], extra: str) -> None:
    code = f"import sys\nsys.modules[{hidden!r}] = None\nfrom hc_retrofit.cli import main\nmain({argv!r})\n"
    done = subprocess.run(
        [sys.executable, "-c", code], env=_env(tmp_path), capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert done.returncode == 1
    assert done.stderr.strip() == (
        f'error: {hidden} is not installed, and this needs it: pip install "hc-retrofit[{extra}]" (or "hc-retrofit[all]")'
    )


def test_plots_name_the_plot_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from hc_retrofit.modeling.errors import HCRetrofitError
    from hc_retrofit.plots import new_figure

    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(HCRetrofitError, match=r'pip install "hc-retrofit\[plot\]"'):
        new_figure()


def test_architectures_check_reports_each_type(cli) -> None:
    result = cli("architectures", "--check", "--types", "olmo,dory", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    outcomes = {r["model_type"]: r["outcome"] for r in report["rows"]}
    assert outcomes == {"olmo": "exact", "dory": "refused"}
    assert report["coverage"]["exact"] == 1 and report["coverage"]["built"] == 2


def test_architectures_check_refuses_unknown_types(cli) -> None:
    result = cli("architectures", "--check", "--types", "olmo,not_a_type")
    assert result.exit_code == 1 and "not_a_type" in result.output and "\n" not in result.output.strip()
    result = cli("architectures", "--markdown")
    assert result.exit_code == 1 and "--check" in result.output
    result = cli("architectures", "--check", "--task", "speech")
    assert result.exit_code == 1 and "choose one of causal-lm, masked-lm, image-classification, base" in result.output
    result = cli("architectures", "--check", "--task", "image-classification", "--types", "llama")
    assert result.exit_code == 1 and "not a image-classification model type" in result.output


def test_architectures_check_measures_other_tasks(cli) -> None:
    result = cli("architectures", "--check", "--task", "image-classification", "--types", "vit", "--markdown")
    assert result.exit_code == 0, result.output
    assert "**1 of 1 image-classification types that build as tiny random models convert exactly" in result.stdout
    assert "`hc-retrofit architectures --check --markdown --task image-classification`" in result.stdout
    assert "| vit | exact | vit.layers: sequential [layernorm_before -> attention; layernorm_after -> mlp] |" in (
        result.stdout
    )
