"""`hc-retrofit push`: upload to a fake Hub, dry run, and the refusals."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub.constants
import pytest

from tests.hub_server import FakeHub


@pytest.fixture
def own_copy(converted_dir: Path, tmp_path: Path) -> Path:
    """A copy of the converted checkpoint (push writes README.md into the directory)."""
    import shutil

    return Path(shutil.copytree(converted_dir, tmp_path / "ckpt"))


def test_push_uploads_with_model_card(cli, own_copy: Path, fake_hub: FakeHub) -> None:
    result = cli("push", own_copy, "me/tiny-llama-mhc", "--revision", "v1")
    assert result.exit_code == 0, result.output
    uploaded = fake_hub.files[("me/tiny-llama-mhc", "v1")]
    assert {"config.json", "model.safetensors", "tokenizer.json", "modeling_hc_retrofit.py", "README.md"} <= set(
        uploaded
    )
    assert b"trust_remote_code=True" in uploaded["README.md"]
    assert "uploaded" in result.output and "generated" in result.output


def test_push_dry_run(cli, own_copy: Path, fake_hub: FakeHub) -> None:
    result = cli("push", own_copy, "me/tiny-llama-mhc", "--dry-run", "--private")
    assert result.exit_code == 0, result.output
    assert "dry run" in result.output and "model.safetensors" in result.output and "README.md" in result.output
    assert fake_hub.requests == [] and not (own_copy / "README.md").exists()


def test_push_training_summary_in_card(cli, trained_dir: Path, fake_hub: FakeHub) -> None:
    assert cli("push", trained_dir, "me/trained").exit_code == 0
    card = fake_hub.files[("me/trained", "main")]["README.md"].decode()
    assert "## Training" in card and "eval loss after training: 3.9000" in card and '"lr"' in card


def test_push_refusals(cli, base_dir: Path, own_copy: Path, tmp_path: Path, fake_hub: FakeHub, monkeypatch) -> None:
    result = cli("push", base_dir, "me/x")
    assert result.exit_code == 1 and result.output.startswith("error: ") and "not a converted" in result.output
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))
    result = cli("push", own_copy, "me/x")
    assert result.exit_code == 1 and "no Hugging Face token" in result.output and "Traceback" not in result.output
    assert fake_hub.requests == [] and not (own_copy / "README.md").exists()


def test_push_writes_nothing_into_the_directory_and_publishes_no_local_path(
    cli, own_copy: Path, fake_hub: FakeHub
) -> None:
    import json

    before = sorted(p.name for p in own_copy.iterdir())
    local_base = json.loads((own_copy / "config.json").read_text())["hc_retrofit_base"]
    assert local_base.startswith("/")  # converted from a local directory: an absolute path on this machine
    assert cli("push", own_copy, "me/clean").exit_code == 0
    assert sorted(p.name for p in own_copy.iterdir()) == before  # no README.md left behind
    uploaded = fake_hub.files[("me/clean", "main")]
    for name in ("README.md", "config.json"):
        assert local_base.encode() not in uploaded[name], name
    assert json.loads(uploaded["config.json"])["hc_retrofit_base"] == Path(local_base).name
    assert b"base_model:" not in uploaded["README.md"]  # a local base is not a Hub id


def test_push_refuses_a_link_out_of_the_checkpoint(cli, own_copy: Path, tmp_path: Path, fake_hub: FakeHub) -> None:
    secret = tmp_path / "token"
    secret.write_text("hf_secret")
    (own_copy / "extra.txt").symlink_to(secret)
    result = cli("push", own_copy, "me/leak")
    assert result.exit_code == 1 and "outside the checkpoint" in result.output and "Traceback" not in result.output
    assert fake_hub.requests == []


def test_push_reads_training_files_only_from_its_own_run(cli, own_copy: Path, fake_hub: FakeHub) -> None:
    """A checkpoint that merely sits in a folder with someone's summary.json does not publish it."""
    (own_copy.parent / "summary.json").write_text('{"steps": 999, "final_eval_loss": 0.123}')
    assert cli("push", own_copy, "me/alone").exit_code == 0
    assert b"0.123" not in fake_hub.files[("me/alone", "main")]["README.md"]
