"""Model card and upload: end to end against a fake Hub on 127.0.0.1 (HF_ENDPOINT points at it)."""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub.constants
import pytest

import hc_retrofit
from hc_retrofit import hub, model_card
from hc_retrofit.modeling.errors import HubError, NotConvertedError
from hc_retrofit.saving import save_converted
from tests.hub_server import FakeHub
from tests.tiny import tiny_encoder, tiny_model


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    from hc_retrofit import outputs

    outputs.write_marker(tmp_path / "run", "run")  # `train` creates its run dir with a manifest
    model = hc_retrofit.convert(tiny_model("qwen2-tied"), hc_retrofit.HCConfig(num_streams=4, variant="mhc"))
    return save_converted(model, tmp_path / "run" / "final", base_model="org/tiny-qwen2")


def test_model_card(checkpoint: Path) -> None:
    card = model_card.model_card(checkpoint, "me/tiny-mhc")
    assert card.startswith("---\n") and "base_model: org/tiny-qwen2" in card
    assert "hc-retrofit" in card and '| `variant` | `"mhc"` |' in card
    added = sum(1 for line in card.splitlines() if line.startswith("| parameters added |"))
    assert added == 1
    assert 'AutoModelForCausalLM.from_pretrained("me/tiny-mhc", trust_remote_code=True)' in card
    assert "hc_retrofit.load_converted" in card
    assert "## Training" not in card


def test_model_card_of_an_encoder_loads_it_with_its_auto_class(tmp_path: Path) -> None:
    model = hc_retrofit.convert(tiny_encoder("roberta-masked-lm"), hc_retrofit.HCConfig(num_streams=2))
    card = model_card.model_card(save_converted(model, tmp_path / "roberta"), "me/tiny-roberta")
    assert 'AutoModelForMaskedLM.from_pretrained("me/tiny-roberta", trust_remote_code=True)' in card


def test_model_card_training_summary(checkpoint: Path) -> None:
    (checkpoint.parent / "summary.json").write_text(json.dumps({"steps": 400, "final_eval_loss": 1.7271}))
    (checkpoint.parent / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    card = model_card.model_card(checkpoint)
    assert "## Training" in card and "- steps: 400" in card and "1.7271" in card and "logged metric rows: 2" in card


def test_push_end_to_end(checkpoint: Path, fake_hub: FakeHub) -> None:
    plan = hub.push_checkpoint(checkpoint, "me/tiny-mhc", private=True, revision="exp-1")
    assert fake_hub.repos["me/tiny-mhc"]["visibility"] == "private"
    assert "exp-1" in fake_hub.branches["me/tiny-mhc"]
    uploaded = fake_hub.files[("me/tiny-mhc", "exp-1")]
    assert set(plan.files) == set(uploaded)
    for name in ("config.json", "model.safetensors", "modeling_hc_retrofit.py", "patch.py", "README.md"):
        assert name in uploaded, name
    assert uploaded["model.safetensors"] == (checkpoint / "model.safetensors").read_bytes()
    assert b"base_model: org/tiny-qwen2" in uploaded["README.md"]
    assert plan.commit == "0123456789abcdef0123456789abcdef01234567"
    assert not any(name.startswith(".") for name in uploaded)


def test_push_keeps_a_user_written_card(checkpoint: Path, fake_hub: FakeHub) -> None:
    (checkpoint / "README.md").write_text("# my own card\n")
    plan = hub.push_checkpoint(checkpoint, "me/tiny-mhc")
    assert not plan.card_generated
    assert fake_hub.files[("me/tiny-mhc", "main")]["README.md"] == b"# my own card\n"


def test_dry_run_sends_nothing(checkpoint: Path, fake_hub: FakeHub) -> None:
    plan = hub.push_checkpoint(checkpoint, "me/tiny-mhc", dry_run=True)
    assert fake_hub.requests == []
    assert "README.md" in plan.files and "model.safetensors" in plan.files
    assert not (checkpoint / "README.md").exists(), "a dry run writes nothing"


def test_push_errors(checkpoint: Path, tmp_path: Path, fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    plain = tmp_path / "plain"
    tiny_model("gpt2").save_pretrained(plain)
    with pytest.raises(NotConvertedError):
        hub.push_checkpoint(plain, "me/x")
    with pytest.raises(HubError, match="rejected"):
        hub.push_checkpoint(checkpoint, "me/x", token="hf_wrong")
    with pytest.raises(HubError, match="OWNER/NAME"):
        hub.push_checkpoint(checkpoint, "a/b/c")
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))
    with pytest.raises(HubError, match="no Hugging Face token"):
        hub.push_checkpoint(checkpoint, "me/x")
    assert fake_hub.files == {}
