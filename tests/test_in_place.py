"""Turning a loaded base into a converted checkpoint's model in place (verify's one-model path)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import hc_retrofit
from hc_retrofit.base_model import load_base_model
from hc_retrofit.in_place import NotInPlace, become_checkpoint
from hc_retrofit.loading import load_converted
from hc_retrofit.modeling.errors import CheckpointError
from hc_retrofit.modeling.patch import is_converted
from hc_retrofit.saving import save_converted
from hc_retrofit.verify import verify_checkpoint
from tests.checkpoints import save_base, train_a_few_steps

CASES = ["llama-gqa-untied", "qwen2-tied", "gemma2-sandwich", "gpt2"]


def _ids() -> torch.Tensor:
    return torch.randint(3, 64, (2, 10), generator=torch.Generator().manual_seed(3))


def _written(case: str, tmp_path: Path, *, trained: bool = True) -> tuple[Path, Path]:
    base_dir = save_base(case, tmp_path / "base")
    model, _ = load_base_model(str(base_dir), dtype=torch.float32)
    model = hc_retrofit.convert(model, hc_retrofit.HCConfig(num_streams=4, variant="mhc"))
    if trained:  # every tensor away from what the base and the HC init hold
        model = train_a_few_steps(model, steps=2)
    return base_dir, save_converted(model, tmp_path / "converted")


@pytest.mark.parametrize("case", CASES)
def test_in_place_computes_what_the_loader_loads(case: str, tmp_path: Path) -> None:
    base_dir, out = _written(case, tmp_path)
    base, _ = load_base_model(str(base_dir), dtype=torch.float32)
    in_place = become_checkpoint(base, out).eval()
    loaded = load_converted(out, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(in_place(_ids()).logits, loaded(_ids()).logits, rtol=0, atol=0)
    state = loaded.state_dict()
    for name, tensor in in_place.state_dict().items():
        assert torch.equal(tensor, state[name]), name


def test_files_that_are_not_the_models_tensors_are_left_to_the_loader(tmp_path: Path) -> None:
    """A missing tensor: not done in place (the model unchanged); verify's loader then refuses the files."""
    base_dir, out = _written("llama-gqa-untied", tmp_path, trained=False)
    shard = out / "model.safetensors"
    tensors = load_file(shard)
    hc_name = next(k for k in tensors if ".hyper_connections." in k)
    del tensors[hc_name]
    save_file(tensors, shard, metadata={"format": "pt"})
    base, _ = load_base_model(str(base_dir), dtype=torch.float32)
    with pytest.raises(NotInPlace, match=f"missing tensor {hc_name}"):
        become_checkpoint(base, out)
    assert not is_converted(base) and not hasattr(base.config, "hc_retrofit")
    with pytest.raises(CheckpointError, match="does not match the model it describes"):
        verify_checkpoint(out, base=str(base_dir), mode="memory")


def test_a_changed_hc_tensor_fails_verify(tmp_path: Path) -> None:
    """The one-model verify reads the written files: a changed tensor is not equivalent."""
    _, out = _written("llama-gqa-untied", tmp_path, trained=False)
    assert verify_checkpoint(out, mode="memory").equivalent
    shard = out / "model.safetensors"
    tensors = load_file(shard)
    name = next(k for k in tensors if k.endswith("hyper_connections.0.depth_logits") or ".hyper_connections.0." in k)
    tensors[name] = tensors[name] + 0.5
    save_file(tensors, shard, metadata={"format": "pt"})
    assert not verify_checkpoint(out, mode="memory").equivalent


def test_a_checkpoint_whose_keys_the_loader_converts_is_loaded_whole(tmp_path: Path) -> None:
    """MoE experts are stored in another layout than the model holds: verify loads the checkpoint instead."""
    base_dir, out = _written("mixtral-moe", tmp_path, trained=False)
    base, _ = load_base_model(str(base_dir), dtype=torch.float32)
    with pytest.raises(NotInPlace, match="unexpected tensor"):
        become_checkpoint(base, out)
    assert not is_converted(base)
    assert verify_checkpoint(out, mode="memory").equivalent


def test_another_config_is_not_done_in_place(tmp_path: Path) -> None:
    base_dir, out = _written("llama-gqa-untied", tmp_path, trained=False)
    other = save_base("qwen2-tied", tmp_path / "other")
    base, _ = load_base_model(str(other), dtype=torch.float32)
    with pytest.raises(NotInPlace, match="config differs"):
        become_checkpoint(base, out)
    assert not is_converted(base)
    assert base_dir.is_dir()
