"""What serving engines' Transformers backends build from a converted checkpoint, checked with plain
transformers: ``auto_map`` names a base-model class (``AutoModel``) that retrofits itself, returns the
streams reduced to ``(B, T, D)``, keeps its HC tensors float32 under a bfloat16 model, and keeps its
hooks when an engine swaps a hooked module for its own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM

import hc_retrofit
from hc_retrofit import remote_code
from hc_retrofit.modeling.remote_model import HC_MODULES
from tests.serving.models import PROMPTS, base_model, perturb


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = hc_retrofit.convert(base_model("llama"), hc_retrofit.HCConfig(num_streams=4, variant="mhc"))
    return hc_retrofit.save_converted(perturb(model), tmp_path_factory.mktemp("base") / "ckpt")


def test_auto_map_names_the_base_model_first_and_only_the_modeling_file(checkpoint: Path) -> None:
    config = json.loads((checkpoint / "config.json").read_text())
    auto_map = config["auto_map"]
    assert list(auto_map)[:3] == ["AutoConfig", "AutoModel", "AutoModelForCausalLM"]
    assert auto_map["AutoModel"] == "modeling_hc_retrofit.HCRetrofitLlamaModel"
    assert all(v.startswith("modeling_hc_retrofit.") for v in auto_map.values())
    assert config[remote_code.ATTENTION_INTERFACE_KEY] is True


def test_base_model_returns_the_reduced_hidden_states_of_the_causal_lm(checkpoint: Path) -> None:
    lm = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True).eval()
    base = AutoModel.from_pretrained(checkpoint, trust_remote_code=True).eval()
    assert type(base).__name__ == "HCRetrofitLlamaModel"
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        hidden = base(ids).last_hidden_state
        assert hidden.shape == (1, len(PROMPTS[0]), lm.config.hidden_size)
        torch.testing.assert_close(hidden, lm.model(ids).last_hidden_state, rtol=0, atol=0)
        torch.testing.assert_close(lm.lm_head(hidden), lm(ids).logits, rtol=0, atol=0)


def test_hc_tensors_stay_float32_in_a_bfloat16_model(checkpoint: Path) -> None:
    base = AutoModel.from_pretrained(checkpoint, trust_remote_code=True, dtype=torch.bfloat16)
    assert HC_MODULES in base._keep_in_fp32_modules_strict  # what vLLM's backend upcasts by
    dtypes = {name: p.dtype for name, p in base.named_parameters()}
    assert {d for n, d in dtypes.items() if HC_MODULES in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if HC_MODULES not in n} == {torch.bfloat16}


def test_an_unused_hc_tensor_still_fails_a_base_model_load(checkpoint: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    for file in checkpoint.iterdir():
        (broken / file.name).write_bytes(file.read_bytes())
    tensors = load_file(broken / "model.safetensors")
    tensors["model.layers.0.hyper_connections.9.width_logits"] = torch.zeros(4)
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(Exception, match=r"unexpected keys: .*hyper_connections\.9"):
        AutoModel.from_pretrained(broken, trust_remote_code=True)


class _EngineNorm(nn.Module):
    """A serving engine's RMSNorm: the same function, another module (what vLLM swaps in)."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.weight, self.eps = norm.weight, norm.variance_epsilon

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return (self.weight * (x.float() * torch.rsqrt(variance + self.eps))).to(x.dtype)


def test_hooks_follow_modules_an_engine_swaps_in(checkpoint: Path) -> None:
    base = AutoModel.from_pretrained(checkpoint, trust_remote_code=True).eval()
    ids = torch.tensor([PROMPTS[1]])
    with torch.no_grad():
        expected = base(ids).last_hidden_state
        for layer in base.layers:  # as vLLM's recursive_replace does: setattr(parent, name, new)
            layer.input_layernorm = _EngineNorm(layer.input_layernorm)
            layer.post_attention_layernorm = _EngineNorm(layer.post_attention_layernorm)
            layer.mlp = nn.Sequential(layer.mlp)
        torch.testing.assert_close(base(ids).last_hidden_state, expected, rtol=1e-5, atol=1e-5)
