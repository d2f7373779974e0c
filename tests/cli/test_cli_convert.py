"""`hc-retrofit convert`: the happy path, and every kind of bad input (one line, non-zero, nothing written)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hc_retrofit import conversion, saving
from hc_retrofit.base_model import load_base_model
from hc_retrofit.checkpoint_format import is_converted_dir
from hc_retrofit.loading import load_converted
from tests.checkpoints import config_json, save_base


def _one_error_line(result: object) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, result.output
    assert "Traceback" not in result.output
    return errors[0]


def test_convert_writes_a_loadable_checkpoint_and_summary(cli, base_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = cli("convert", base_dir, "--out", out, "--streams", "3", "--variant", "dynamic")
    assert result.exit_code == 0, result.output
    for text in ("llama", "sequential", "layers patched", "3 (6 hyper-connection", "parameters added", "time"):
        assert text in result.output, text
    data = config_json(out)
    assert data["hc_retrofit"]["num_streams"] == 3 and data["hc_retrofit"]["variant"] == "dynamic"
    assert data["hc_retrofit_base"] == str(base_dir.resolve())
    assert (out / "tokenizer.json").is_file()
    model = load_converted(out)
    base, _ = load_base_model(str(base_dir))
    ids = torch.randint(3, 90, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base(ids).logits, rtol=1e-5, atol=1e-5)
    added = sum(p.numel() for n, p in model.named_parameters() if ".hyper_connections." in n)
    assert f"{added:,}" in result.output


def test_convert_bfloat16_keeps_hc_float32(cli, base_dir: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    out = tmp_path / "bf16"
    assert cli("convert", base_dir, "--out", out, "--dtype", "bfloat16").exit_code == 0
    dtypes = {}
    for file in out.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            dtypes.update({k: f.get_slice(k).get_dtype() for k in f.keys()})  # noqa: SIM118
    assert {d for k, d in dtypes.items() if ".hyper_connections." in k} == {"F32"}
    assert {d for k, d in dtypes.items() if ".hyper_connections." not in k} == {"BF16"}


def test_convert_overwrite(cli, base_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("x")
    result = cli("convert", base_dir, "--out", out)
    assert result.exit_code == 1 and "already exists" in _one_error_line(result)
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    result = cli("convert", base_dir, "--out", out, "--overwrite")  # not ours: never replaced
    assert result.exit_code == 1 and "not written by hc-retrofit" in _one_error_line(result)
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    ours = tmp_path / "ours"
    assert cli("convert", base_dir, "--out", ours).exit_code == 0
    (ours / "eval.json").write_text("x")  # the user's file, added later: never lost
    result = cli("convert", base_dir, "--out", ours, "--overwrite")
    assert result.exit_code == 1 and "(eval.json)" in _one_error_line(result)
    (ours / "eval.json").unlink()
    assert cli("convert", base_dir, "--out", ours, "--overwrite").exit_code == 0
    assert is_converted_dir(ours)


def test_convert_overwrite_never_touches_the_source_or_cwd(
    cli, base_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reported data-loss paths: --out = the parent of the source, the source itself, `.`."""
    import shutil

    src = tmp_path / "models" / "mine"
    shutil.copytree(base_dir, src)
    (tmp_path / "models" / "sibling.txt").write_text("keep")
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    for out, message in ((src.parent, "holds the input"), (src, "holds the input"), (src / "sub", "inside the input")):
        result = cli("convert", src, "--out", out, "--overwrite")
        assert result.exit_code == 1 and message in _one_error_line(result)
    monkeypatch.chdir(src.parent)
    result = cli("convert", src, "--out", ".", "--overwrite")
    assert result.exit_code == 1 and "current directory" in _one_error_line(result)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (lambda b, t: ["no-such-org/no-such-model"], "HF_HUB_OFFLINE"),
        (lambda b, t: [t / "not_a_checkpoint"], "no config.json"),
        (lambda b, t: [t / "missing" / "model"], "no such directory"),
        (lambda b, t: [t / "dory"], "cannot convert 'dory' exactly"),
        (lambda b, t: [t / "converted"], "already a converted"),
        (lambda b, t: [b, "--streams", "1"], "num_streams must be >= 2"),
        (lambda b, t: [b, "--streams", "0"], "num_streams must be >= 2"),
        (lambda b, t: [b, "--streams", "-3"], "num_streams must be >= 2"),
        (lambda b, t: [b, "--streams", "10000"], "num_streams must be <= 64"),
        (lambda b, t: [b, "--variant", "hyper"], "unknown variant 'hyper'"),
        (lambda b, t: [b, "--dtype", "int4"], "unknown dtype 'int4'"),
        (lambda b, t: [b, "--out", b / "inside"], "inside the input directory"),
        (lambda b, t: [b, "--out", b], "holds the input"),
    ],
    ids=[
        "unknown-id",
        "not-a-checkpoint",
        "missing-path",
        "unsupported",
        "already-converted",
        "streams-1",
        "streams-0",
        "streams-neg",
        "streams-huge",
        "variant",
        "dtype",
        "out-inside-source",
        "out-is-source",
    ],
)
def test_convert_bad_input(cli, base_dir: Path, tmp_path: Path, make_args, message: str) -> None:
    (tmp_path / "not_a_checkpoint").mkdir()
    from transformers import AutoConfig, AutoModelForCausalLM

    # dory loops over its layers (each runs twice per forward): no adapter can be proven exact
    dory = AutoConfig.for_model(
        "dory",
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=4,
        intermediate_size=8,
        vocab_size=16,
    )
    AutoModelForCausalLM.from_config(dory).save_pretrained(tmp_path / "dory")
    (tmp_path / "converted").mkdir()
    (tmp_path / "converted" / "config.json").write_text(
        '{"model_type": "hc_retrofit_llama", "hc_retrofit": {"num_streams": 4}}'
    )
    args = make_args(base_dir, tmp_path)
    if "--out" not in args:
        args += ["--out", tmp_path / "out"]
    before = sorted(p.name for p in tmp_path.iterdir())
    base_before = sorted(p.name for p in base_dir.iterdir())
    result = cli("convert", *args)
    assert result.exit_code == 1, result.output
    assert message in _one_error_line(result)
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "nothing may be written"
    assert sorted(p.name for p in base_dir.iterdir()) == base_before


def test_convert_usage_errors_are_one_line(cli, base_dir: Path) -> None:
    result = cli("convert", base_dir)
    assert result.exit_code == 2 and "--out" in _one_error_line(result)
    result = cli("convert", base_dir, "--out", "x", "--streams", "four")
    assert result.exit_code == 2 and "--streams" in _one_error_line(result)


def test_ctrl_c_leaves_no_partial_output(cli, base_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(*_args: object, **_kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(saving, "write_remote_code", interrupted)  # mid-save, after the weights
    result = cli("convert", base_dir, "--out", tmp_path / "out")
    assert result.exit_code == 130
    assert "Traceback" not in result.output
    assert _one_error_line(result) == "error: interrupted"  # one line says what happened
    assert list(tmp_path.iterdir()) == []


def test_convert_checkpoint_python_api(base_dir: Path, tmp_path: Path) -> None:
    from hc_retrofit.modeling.config import HCConfig

    messages: list[str] = []
    summary = conversion.convert_checkpoint(
        str(base_dir), tmp_path / "o", HCConfig(variant="static"), progress=messages.append
    )
    assert summary.layers == 3 and summary.sites == 6 and summary.block_kind == "sequential"
    assert summary.added_parameters > 0 and 0 < summary.added_percent < 100
    assert any("saving" in m for m in messages)
    assert summary.to_dict()["added_percent"] == summary.added_percent


def test_unconvertible_base_in_fresh_dir(cli, tmp_path: Path) -> None:
    """A checkpoint with config.json but no weights fails with one line and writes nothing."""
    src = save_base("gpt2", tmp_path / "src", tokenizer=False)
    for f in src.glob("*.safetensors"):
        f.unlink()
    result = cli("convert", src, "--out", tmp_path / "out")
    assert result.exit_code == 1 and "cannot load the weights" in _one_error_line(result)
    assert not (tmp_path / "out").exists()


def test_convert_streams_verifies_and_links(cli, base_dir: Path, tmp_path: Path) -> None:
    import os

    result = cli("convert", base_dir, "--out", tmp_path / "linked", "--link")
    assert result.exit_code == 0, result.output
    assert "streamed (1 base shard: 1 hard linked), verified exact" in result.output
    assert "cannot stream" not in result.output
    shards = list(base_dir.glob("*.safetensors"))
    assert shards and all(any(os.path.samefile(s, o) for o in (tmp_path / "linked").iterdir()) for s in shards)
    result = cli("convert", base_dir, "--out", tmp_path / "memory", "--in-memory")
    assert result.exit_code == 0 and "in memory" in result.output and "streamed" not in result.output


def test_convert_falls_back_to_in_memory_and_says_why(cli, tmp_path: Path) -> None:
    base = save_base("mixtral-moe", tmp_path / "moe")  # per-expert keys on disk, fused experts in the model
    result = cli("convert", base, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "cannot stream" in result.output and "converting in memory instead" in result.output
    assert is_converted_dir(tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moe", "out"]  # the early shard copy was removed


def test_streamed_output_that_fails_verify_is_not_written(
    cli, base_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hc_retrofit import stream_plan

    real = stream_plan.hc_tensors

    def wrong(model: object) -> dict[str, torch.Tensor]:  # b = 2 sigmoid(0.5) != 1 at one site: inexact
        tensors = real(model)
        key = next(k for k in tensors if k.endswith("depth_logits"))
        tensors[key] = tensors[key] + 0.5
        return tensors

    monkeypatch.setattr(stream_plan, "hc_tensors", wrong)
    result = cli("convert", base_dir, "--out", tmp_path / "out")
    assert result.exit_code == 1 and "not equivalent" in _one_error_line(result)
    assert list(tmp_path.iterdir()) == []
