"""Never silently wrong: a damaged or edited input, or a setting that cannot do what it says, is refused in one line."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import pytest

from .conftest import TRAIN, one_line_error


@pytest.mark.parametrize("how", ["stream", "in-memory"])
def test_a_base_whose_model_type_was_edited_is_refused(cli, base_dir: Path, tmp_path: Path, how: str) -> None:
    """llama weights under qwen2's model_type would load with random q/k/v biases: refused, naming them."""
    edited = Path(shutil.copytree(base_dir, tmp_path / "edited"))
    config = json.loads((edited / "config.json").read_text())
    config["model_type"] = "qwen2"
    (edited / "config.json").write_text(json.dumps(config))
    result = cli("convert", edited, "--out", tmp_path / "out", f"--{how}")
    line = one_line_error(result)
    assert result.exit_code == 1 and "do not match its config.json" in line and "q_proj.bias" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("how", ["stream", "in-memory"])
def test_nan_weights_are_refused_as_nan(cli, base_dir: Path, tmp_path: Path, how: str) -> None:
    from safetensors.torch import load_file, save_file

    damaged = Path(shutil.copytree(base_dir, tmp_path / "nan"))
    [file] = damaged.glob("*.safetensors")
    tensors = load_file(str(file))
    name = sorted(k for k in tensors if "mlp" in k)[0]
    tensors[name][0, 0] = math.nan
    save_file(tensors, str(file), metadata={"format": "pt"})
    result = cli("convert", damaged, "--out", tmp_path / "out", f"--{how}")
    line = one_line_error(result)
    assert result.exit_code == 1 and "NaN" in line and name in line and "structure" not in line


def test_an_absurd_batch_size_is_refused_before_training(cli, base_dir: Path, data_file: Path, tmp_path: Path):
    args = [*TRAIN[:2], *TRAIN[4:]]  # all but --batch-size 2
    assert TRAIN[2] == "--batch-size"
    result = cli("train", base_dir, "--data", data_file, "--out", tmp_path / "run", *args, "--batch-size", "100000000")
    assert result.exit_code == 1 and "--batch-size" in one_line_error(result)
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("text", [123, ["a", "list"], None, {"a": "dict"}])
def test_a_jsonl_text_that_is_not_a_string_is_refused(cli, base_dir: Path, tmp_path: Path, text) -> None:
    data = tmp_path / "data.jsonl"
    rows = [{"text": "the cat sat on the mat. " * 20}] * 30 + [{"text": text}] * (1 if text is None else 30)
    data.write_text("".join(json.dumps(r) + "\n" for r in (rows if text is None else rows[30:])))
    result = cli("train", base_dir, "--data", data, "--out", tmp_path / "run", *TRAIN)
    assert result.exit_code == 1 and "not" in one_line_error(result) and "string" in one_line_error(result)


def test_resume_with_other_data_warns_and_the_data_hash_is_recorded(
    cli, base_dir: Path, data_file: Path, tmp_path: Path, caplog
) -> None:
    from hc_retrofit.train.checkpoint import latest_checkpoint, read_state

    run = tmp_path / "run"
    args = ["train", base_dir, "--out", run, "--block-size", "16", "--batch-size", "2", "--eval-every", "0"]
    args += ["--no-progress", "--save-every", "2"]
    assert cli(*args, "--data", data_file, "--max-steps", "3").exit_code == 0
    state = read_state(latest_checkpoint(run)[1])
    assert state["data"]["name"] == "data.txt" and len(state["data"]["sha256"]) == 64
    other = tmp_path / "other.txt"
    other.write_text(data_file.read_text().upper() + "\n\nthe cat sat on the mat.")
    with caplog.at_level(logging.WARNING, logger="hc_retrofit"):
        result = cli(*args, "--data", other, "--max-steps", "4", "--resume")
    assert result.exit_code == 0, result.output
    assert any("--data differs" in r.getMessage() for r in caplog.records)


def test_fp16_on_cpu_is_refused(cli, base_dir: Path, data_file: Path, tmp_path: Path) -> None:
    result = cli("train", base_dir, "--data", data_file, "--out", tmp_path / "run", *TRAIN, "--mixed-precision", "fp16")
    assert result.exit_code == 1 and "fp16" in one_line_error(result) and "bf16" in one_line_error(result)


def test_inspect_of_nan_coefficients_prints_and_writes_valid_json(cli, converted_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    damaged = Path(shutil.copytree(converted_dir, tmp_path / "nan"))
    for file in damaged.glob("*.safetensors"):
        tensors = load_file(str(file))
        hc = [k for k in tensors if ".hyper_connections." in k]
        if hc:
            for key in hc:
                tensors[key] = tensors[key].fill_(math.nan)
            save_file(tensors, str(file), metadata={"format": "pt"})
    result = cli("inspect", damaged, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)  # NaN written as null: valid JSON
    assert any(v is None for site in report["sites"] for v in site["width"])
    table = cli("inspect", damaged)
    assert table.exit_code == 0 and "[nan" in table.output and "Traceback" not in table.output
