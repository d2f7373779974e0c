"""`hc-retrofit verify`: equivalence of a fresh conversion, trained models, bad input."""

from __future__ import annotations

import json
from pathlib import Path

from tests.checkpoints import save_base


def test_verify_fresh_conversion_passes(cli, converted_dir: Path) -> None:
    result = cli("verify", converted_dir)
    assert result.exit_code == 0, result.output
    assert "equivalent" in result.output and "100.0% of tokens agree" in result.output


def test_verify_json(cli, converted_dir: Path, base_dir: Path) -> None:
    result = cli("verify", converted_dir, "--json", "--base", base_dir)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["equivalent"] and report["ok"] and report["greedy_identical"]
    assert report["max_abs_logit_diff"] <= report["logit_tolerance"] and report["max_kl"] < 1e-6
    assert report["variant"] == "mhc" and report["num_streams"] == 4


def test_verify_trained_model_fails_unless_trained_flag(cli, trained_dir: Path) -> None:
    result = cli("verify", trained_dir, "--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert not report["equivalent"] and report["max_abs_logit_diff"] > 1e-3
    result = cli("verify", trained_dir, "--trained")
    assert result.exit_code == 0, result.output
    assert "trained" in result.output


def test_verify_against_the_wrong_base_fails(cli, converted_dir: Path, tmp_path: Path) -> None:
    other = save_base("llama-gqa-untied", tmp_path / "other", seed=7)
    result = cli("verify", converted_dir, "--base", other)
    assert result.exit_code == 1 and "NOT equivalent" in result.output


def test_verify_bad_input(cli, base_dir: Path, tmp_path: Path) -> None:
    result = cli("verify", base_dir)
    assert result.exit_code == 1 and result.output.startswith("error: ") and "not a converted" in result.output
    (tmp_path / "empty").mkdir()
    result = cli("verify", tmp_path / "empty")
    assert result.exit_code == 1 and "no config.json" in result.output
    assert "Traceback" not in result.output


def test_verify_refuses_an_encoder_checkpoint_in_one_line(cli, tmp_path: Path) -> None:
    import hc_retrofit
    from tests.tiny import tiny_encoder

    model = tiny_encoder("bert-masked-lm")
    model.save_pretrained(tmp_path / "base")
    out = hc_retrofit.save_converted(hc_retrofit.convert(model), tmp_path / "hc", base_model=str(tmp_path / "base"))
    result = cli("verify", out)
    assert result.exit_code == 1 and result.output.startswith("error: ") and "not a causal LM" in result.output
    assert "Traceback" not in result.output and "\n" not in result.output.strip()


def test_verify_needs_a_base_when_none_is_recorded(cli, converted_dir: Path, tmp_path: Path) -> None:
    import json
    import shutil

    copy = Path(shutil.copytree(converted_dir, tmp_path / "ckpt"))
    data = json.loads((copy / "config.json").read_text())
    data.pop("hc_retrofit_base")
    (copy / "config.json").write_text(json.dumps(data))
    result = cli("verify", copy)
    assert result.exit_code == 1 and "--base" in result.output and result.output.startswith("error: ")


def test_verify_checks_the_shipped_modeling_code(cli, converted_dir: Path, tmp_path: Path) -> None:
    """trust_remote_code users run the shipped files: an edited or missing one is not vouched for."""
    import shutil

    edited = Path(shutil.copytree(converted_dir, tmp_path / "edited"))
    with (edited / "site.py").open("a") as f:
        f.write("\nimport os  # something else now\n")
    result = cli("verify", edited, "--json")
    report = json.loads(result.stdout)
    assert result.exit_code == 1 and report["equivalent"] and not report["ok"]
    [problem] = report["remote_code_problems"]
    assert problem.startswith("site.py differs from what hc-retrofit") and problem.endswith("(+2 -0 lines)")
    missing = Path(shutil.copytree(converted_dir, tmp_path / "missing"))
    (missing / "modeling_hc_retrofit.py").unlink()
    result = cli("verify", missing)
    assert result.exit_code == 1 and "modeling_hc_retrofit.py is missing" in result.output


def test_training_a_converted_dir_never_asks_to_run_its_code(converted_dir: Path, monkeypatch) -> None:
    """hc-retrofit loads its own format with its own code: transformers' remote-code prompt is never reached."""
    import transformers.dynamic_module_utils as dynamic

    from hc_retrofit.train.model import load_model
    from hc_retrofit.train.recipe import TrainConfig

    def no_remote_code(*args, **kwargs):
        raise AssertionError("asked whether to run the checkpoint's code")

    monkeypatch.setattr(dynamic, "resolve_trust_remote_code", no_remote_code)
    for module in ("transformers.models.auto.tokenization_auto", "transformers.models.auto.configuration_auto"):
        import importlib

        mod = importlib.import_module(module)
        if hasattr(mod, "resolve_trust_remote_code"):
            monkeypatch.setattr(mod, "resolve_trust_remote_code", no_remote_code)
    model, tokenizer = load_model(TrainConfig(model=str(converted_dir), data="x", out="y"))
    assert tokenizer is not None and len(tokenizer) > 0 and hasattr(model, "hc_config")


def test_verify_compares_a_dtype_changing_conversion_at_its_precision(cli, base_dir: Path, tmp_path: Path) -> None:
    """``convert --dtype bfloat16`` rounds the base once: verify rounds the base the same way, and says so."""
    import torch

    from hc_retrofit.verify import verify_checkpoint

    for how in ("--in-memory", "--no-verify"):  # both conversion paths, checked by verify alone
        out = tmp_path / how.strip("-")
        assert cli("convert", base_dir, "--out", out, "--dtype", "bfloat16", how).exit_code == 0
        result = cli("verify", out, "--json")
        report = json.loads(result.stdout)
        assert result.exit_code == 0, result.output
        assert report["equivalent"] and report["base_dtype"] == "bfloat16"
    # against the unrounded base the same checkpoint differs: the default above is what makes it pass
    assert not verify_checkpoint(out, base_dtype=torch.float32).equivalent


def test_verify_names_a_recorded_base_that_is_gone(cli, converted_dir: Path, tmp_path: Path) -> None:
    import shutil

    copy = Path(shutil.copytree(converted_dir, tmp_path / "ckpt"))
    data = json.loads((copy / "config.json").read_text())
    data["hc_retrofit_base"] = str(tmp_path / "moved-away")
    (copy / "config.json").write_text(json.dumps(data))
    result = cli("verify", copy, "--trained")
    assert result.exit_code == 1 and result.output.startswith("error: the base model recorded in")
    assert "moved-away" in result.output and "pass it with --base" in result.output


def test_verify_layer_by_layer(cli, converted_dir: Path) -> None:
    result = cli("verify", converted_dir, "--mode", "layers")
    assert result.exit_code == 0, result.output
    assert "layer by layer (one decoder layer in memory at a time)" in result.output and "equivalent" in result.output
    result = cli("verify", converted_dir, "--mode", "disk")
    assert result.exit_code == 1 and result.output.startswith("error: ") and "--mode" in result.output
