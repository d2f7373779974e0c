"""A catalogue of damaged inputs and faults: each ends in one line, exit 1, nothing written (issue 9)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from hc_retrofit import outputs
from tests.checkpoints import HUB_OFFLINE_ENV


def _one_line(result) -> str:
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    return lines[0]


def _first_shard(directory: Path) -> Path:
    return sorted(directory.glob("*.safetensors"))[0]


def _damage(directory: Path, how: str) -> None:
    shard = _first_shard(directory)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2] if how == "truncate" else b"garbage!" * 64)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "data.txt").write_text("the cat sat on the mat. " * 400)
    return tmp_path


@pytest.mark.parametrize("how", ["truncate", "garbage"])
def test_damaged_weights(cli, base_dir: Path, converted_dir: Path, workdir: Path, how: str) -> None:
    base = Path(shutil.copytree(base_dir, workdir / "base"))
    _damage(base, how)
    result = cli("convert", base, "--out", workdir / "out")
    assert "download or copy the checkpoint again" in _one_line(result) and result.exit_code == 1
    conv = Path(shutil.copytree(converted_dir, workdir / "conv"))
    _damage(conv, how)
    for command in (["verify", conv], ["inspect", conv]):
        result = cli(*command)
        assert result.exit_code == 1 and _first_shard(conv).name in _one_line(result)
    assert sorted(p.name for p in workdir.iterdir()) == ["base", "conv", "data.txt"]


def test_config_edited_to_disagree_with_the_weights(cli, converted_dir: Path, workdir: Path) -> None:
    conv = Path(shutil.copytree(converted_dir, workdir / "conv"))
    config = json.loads((conv / "config.json").read_text())
    config["hc_retrofit"]["num_streams"] = 2
    (conv / "config.json").write_text(json.dumps(config))
    result = cli("verify", conv)
    assert result.exit_code == 1 and "disagree with config.json" in _one_line(result)
    config["hc_retrofit"]["num_streams"] = 4
    config["hc_retrofit"]["sinkhorn_iters"] = 10**9  # crafted: must not hang inspect
    (conv / "config.json").write_text(json.dumps(config))
    result = cli("inspect", conv)
    assert result.exit_code == 1 and "sinkhorn_iters" in _one_line(result)


@pytest.mark.parametrize(
    ("content", "name", "message"),
    [
        (b"", "empty.txt", "is empty"),
        (bytes(range(256)) * 8, "binary.txt", "UnicodeDecodeError"),
        (b"{not json\n", "broken.jsonl", "check the file's format"),
    ],
)
def test_bad_data_files(cli, converted_dir: Path, workdir: Path, content: bytes, name: str, message: str) -> None:
    (workdir / name).write_bytes(content)
    result = cli("train", converted_dir, "--data", workdir / name, "--out", workdir / "run", "--block-size", "16")
    assert result.exit_code == 1 and message in _one_line(result)
    assert not (workdir / "run").exists() or not any(p.name != outputs.MARKER for p in (workdir / "run").iterdir())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--block-size", "100000"], "longer than the model's"),
        (["--lr", "nan"], "lr must be a finite number"),
        (["--lr", "1e30"], "lr must be in (0, 1]"),
        (["--hc-lr-multiplier", "inf"], "hc_lr_multiplier must be a finite number"),
        (["--streams", "10000"], "streams must be <= 64"),
    ],
)
def test_bad_train_settings(cli, base_dir: Path, workdir: Path, args: list[str], message: str) -> None:
    result = cli("train", base_dir, "--data", workdir / "data.txt", "--out", workdir / "run", *args)
    assert result.exit_code == 1 and message in _one_line(result)
    assert not (workdir / "run").exists() or not any(p.name != outputs.MARKER for p in (workdir / "run").iterdir())


@pytest.mark.parametrize(
    ("recipe", "message"), [("lr: [1, 2]\n", "lr must be of type float"), ("data: 5\n", "data must be of type str")]
)
def test_recipe_values_of_the_wrong_type(cli, base_dir: Path, workdir: Path, recipe: str, message: str) -> None:
    (workdir / "recipe.yaml").write_text(recipe)
    result = cli("train", base_dir, "--out", workdir / "run", "-c", workdir / "recipe.yaml")
    assert result.exit_code == 1 and message in _one_line(result)


@pytest.mark.parametrize("name", ["my org/my model", "org%2fmodel", "a/b/c/d"])
def test_malformed_hub_ids(cli, workdir: Path, name: str) -> None:
    result = cli("convert", name, "--out", workdir / "out")
    assert result.exit_code == 1 and ("valid Hub id" in _one_line(result) or "no such directory" in _one_line(result))
    result = cli("push", workdir, name.replace("/", " "), "--dry-run")
    assert result.exit_code == 1


def test_unwritable_plot_path(cli, converted_dir: Path, workdir: Path) -> None:
    result = cli("inspect", converted_dir, "--plot", workdir / "data.txt" / "x.png")
    assert result.exit_code == 1 and "--plot" in _one_line(result)


def test_disk_full_while_saving_leaves_nothing(cli, base_dir: Path, workdir: Path, monkeypatch) -> None:
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(workdir))

    monkeypatch.setattr(outputs, "replace_dir", full)
    result = cli("convert", base_dir, "--out", workdir / "out")
    assert result.exit_code == 1 and "No space left on device" in _one_line(result)
    assert sorted(p.name for p in workdir.iterdir()) == ["data.txt"]  # no output, no .partial


KILL_DURING = """
import os, signal, sys
from hc_retrofit import outputs
from hc_retrofit.train import checkpoint
target = sys.argv[1]
if target == "replace_dir":
    outputs.replace_dir = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
else:
    real = checkpoint.save_checkpoint
    def save(accelerator, out_dir, step, state, **kwargs):
        if step == 4:  # the second save: killed after accelerate wrote it, before it became a checkpoint
            accelerator.save_state = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
        return real(accelerator, out_dir, step, state, **kwargs)
    checkpoint.save_checkpoint = save
from hc_retrofit.cli.app import main
main(sys.argv[2:])
"""


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, **HUB_OFFLINE_ENV, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    return subprocess.run(
        [sys.executable, "-c", KILL_DURING, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def test_kill_9_during_convert_and_train_saves(cli, base_dir: Path, workdir: Path) -> None:
    killed = _run("replace_dir", "convert", str(base_dir), "--out", str(workdir / "out"), cwd=workdir)
    assert killed.returncode == -signal.SIGKILL
    assert not (workdir / "out").exists()  # only a hidden .partial may remain ...
    assert cli("convert", base_dir, "--out", workdir / "out").exit_code == 0
    assert sorted(p.name for p in workdir.iterdir()) == ["data.txt", "out"]  # ... and the next run cleans it

    run = workdir / "run"
    train = ["train", str(base_dir), "--data", str(workdir / "data.txt"), "--out", str(run), "--block-size", "16"]
    train += ["--batch-size", "2", "--max-steps", "6", "--save-every", "2", "--eval-every", "0", "--no-progress"]
    killed = _run("save_checkpoint", *train, cwd=workdir)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    result = cli(*train, "--resume")
    assert result.exit_code == 0, result.output
    assert "resuming from" in result.output and "step-00000002" in result.output
    assert json.loads((run / "summary.json").read_text())["steps"] == 6
