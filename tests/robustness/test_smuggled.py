"""Nothing smuggled: verify and push judge the code a trust_remote_code user runs, and push publishes no local path."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from hc_retrofit.code_check import code_problems
from tests.hub_server import FakeHub

from .conftest import one_line_error

EVIL = "import os\nos.system('echo pwned')\n"


@pytest.fixture
def ckpt(converted_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(converted_dir, tmp_path / "ckpt"))


def _redirect_auto_map(ckpt: Path) -> None:
    config = json.loads((ckpt / "config.json").read_text())
    config["auto_map"]["AutoModelForCausalLM"] = "evil.HCRetrofitLlamaForCausalLM"
    (ckpt / "config.json").write_text(json.dumps(config))
    (ckpt / "evil.py").write_text(EVIL)


def _edit(ckpt: Path, how: str) -> str:
    """Tamper with ``ckpt``; return a word the problem line must contain."""
    if how == "auto_map":
        _redirect_auto_map(ckpt)
        return "evil"
    if how == "other_repo":
        config = json.loads((ckpt / "config.json").read_text())
        config["auto_map"]["AutoConfig"] = "someone/repo--modeling_x.Config"
        (ckpt / "config.json").write_text(json.dumps(config))
        return "someone/repo"
    if how == "tokenizer_auto_map":
        tok = json.loads((ckpt / "tokenizer_config.json").read_text())
        tok["auto_map"] = {"AutoTokenizer": ["tokenization_evil.T", None]}
        (ckpt / "tokenizer_config.json").write_text(json.dumps(tok))
        return "tokenizer_config.json"
    if how == "extra_py":
        (ckpt / "sub").mkdir()
        (ckpt / "sub" / "helpers.py").write_text(EVIL)
        return "sub/helpers.py"
    if how == "edited_module":
        with (ckpt / "site.py").open("a") as f:
            f.write(EVIL)
        return "site.py"
    if how == "executable":
        (ckpt / "run.sh").write_text("#!/bin/sh\n")
        return "run.sh"
    if how == "exec_bit":
        (ckpt / "notes").write_text("x")
        os.chmod(ckpt / "notes", 0o755)
        return "notes"
    if how == "pickle":
        (ckpt / "training_args.bin").write_bytes(b"\x80\x04K\x01.")
        return "training_args.bin"
    raise AssertionError(how)


TAMPERING = [
    "auto_map",
    "other_repo",
    "tokenizer_auto_map",
    "extra_py",
    "edited_module",
    "executable",
    "exec_bit",
    "pickle",
]


@pytest.mark.parametrize("how", TAMPERING)
def test_code_check_finds_every_kind_of_tampering(ckpt: Path, how: str) -> None:
    assert code_problems(ckpt) == []
    word = _edit(ckpt, how)
    problems = code_problems(ckpt)
    assert problems and any(word in p for p in problems), problems


def test_verify_does_not_vouch_for_a_redirected_auto_map(cli, ckpt: Path) -> None:
    _redirect_auto_map(ckpt)
    result = cli("verify", ckpt, "--json")
    report = json.loads(result.stdout)
    assert result.exit_code == 1 and report["equivalent"] and not report["ok"]
    assert any("evil" in p and "auto_map" in p for p in report["remote_code_problems"])
    assert any(p.startswith("evil.py is not modeling code") for p in report["remote_code_problems"])


def test_every_auto_class_into_our_modeling_file_is_allowed(ckpt: Path) -> None:
    config = json.loads((ckpt / "config.json").read_text())
    model_ref = config["auto_map"]["AutoModelForCausalLM"]
    config["auto_map"]["AutoModel"] = model_ref  # as a serving backend loads it
    (ckpt / "config.json").write_text(json.dumps(config))
    assert code_problems(ckpt) == []
    config["auto_map"]["AutoModel"] = "modeling_hc_retrofit.NoSuchClass"
    (ckpt / "config.json").write_text(json.dumps(config))
    assert any("NoSuchClass" in p for p in code_problems(ckpt))


@pytest.mark.parametrize("how", ["auto_map", "edited_module", "extra_py"])
def test_push_refuses_modified_code_unless_allowed(cli, ckpt: Path, fake_hub: FakeHub, how: str) -> None:
    _edit(ckpt, how)
    result = cli("push", ckpt, "me/x")
    assert result.exit_code == 1 and "--allow-modified-code" in one_line_error(result)
    assert fake_hub.files == {}
    result = cli("push", ckpt, "me/x", "--allow-modified-code")
    assert result.exit_code == 0, result.output
    assert "published anyway" in result.output
    if how == "edited_module":
        assert "site.py differs" in result.output and "lines)" in result.output  # the diff summary


def test_push_publishes_no_local_path(cli, ckpt: Path, fake_hub: FakeHub, tmp_path: Path) -> None:
    config = json.loads((ckpt / "config.json").read_text())
    config["hc_retrofit_metadata"] = {"training": {"data": "corpora/my-private-notes.txt", "recipe": "../r.yaml"}}
    (ckpt / "config.json").write_text(json.dumps(config))
    (ckpt / "runs").mkdir()
    (ckpt / "runs" / "settings.json").write_text(json.dumps({"out": "/home/alice/exp/run3", "lr": 1e-3}))
    (ckpt / "NOTES.md").write_text(f"trained from {tmp_path}/data/x.txt, see ~/exp/log.txt\n")
    dry = cli("push", ckpt, "me/x", "--dry-run")
    assert dry.exit_code == 0, dry.output
    for shown in ("corpora/my-private-notes.txt", "../r.yaml", "/home/alice/exp/run3", "~/exp/log.txt"):
        assert shown in dry.output
    assert cli("push", ckpt, "me/x").exit_code == 0
    uploaded = fake_hub.files[("me/x", "main")]
    blob = b"\n".join(uploaded.values())
    for secret in (b"corpora/", b"/home/alice", str(tmp_path).encode(), b"~/exp", str(ckpt).encode()):
        assert secret not in blob, secret
    assert json.loads(uploaded["runs/settings.json"]) == {"out": "run3", "lr": 1e-3}
    assert uploaded["model.safetensors"] == (ckpt / "model.safetensors").read_bytes()  # weights untouched


def test_push_dry_run_prints_the_card_with_license_and_base_model(cli, ckpt: Path, base_dir: Path, tmp_path: Path):
    result = cli("push", ckpt, "me/x", "--dry-run")
    assert result.exit_code == 0
    assert "library_name: transformers" in result.output and "trust_remote_code=True" in result.output
    assert "no license" in result.output and "--license" in result.output  # the base states none: said
    (base_dir / "README.md").write_text("---\nlicense: apache-2.0\nbase_model: org/original\n---\n# tiny\n")
    try:
        result = cli("push", ckpt, "me/x", "--dry-run")
    finally:
        (base_dir / "README.md").unlink()
    assert "license: apache-2.0" in result.output and "base_model: org/original" in result.output
    assert "no license" not in result.output
    result = cli("push", ckpt, "me/x", "--dry-run", "--license", "mit")
    assert "license: mit" in result.output


def test_the_bundled_models_licence_reaches_the_card(cli, tmp_path: Path) -> None:
    import hc_retrofit

    bundled = Path(hc_retrofit.__file__).parent / "data" / "stories260K"
    assert cli("convert", bundled, "--out", tmp_path / "out").exit_code == 0
    result = cli("push", tmp_path / "out", "me/stories", "--dry-run")
    assert "license: mit" in result.output
