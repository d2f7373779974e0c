"""Reversible surgery: remove_hyper_connections undoes convert exactly, a converted model pickles, and the
site hooks follow a child module that is replaced after conversion (as vLLM and peft replace modules)."""

from __future__ import annotations

import copy
import io
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import hc_retrofit
from hc_retrofit import HCConfig
from hc_retrofit.modeling.patch import decoder_layers
from hc_retrofit.tiny_models import build_tiny
from tests.tiny import CASES, VOCAB, tiny_model

# hand-written families, plus families the converter discovers (no hand-written adapter)
DISCOVERED = ["cohere", "starcoder2", "stablelm"]


def _hook_counts(module: nn.Module) -> tuple[int, ...]:
    return tuple(
        len(getattr(module, name))
        for name in (
            "_forward_pre_hooks",
            "_forward_hooks",
            "_forward_pre_hooks_with_kwargs",
            "_forward_hooks_with_kwargs",
            "_backward_hooks",
            "_state_dict_hooks",
            "_load_state_dict_pre_hooks",
        )
    )


def _fingerprint(model: nn.Module) -> dict:
    """Everything conversion may change, by identity where identity matters."""
    return {
        "modules": [(name, type(m), tuple(sorted(m.__dict__)), _hook_counts(m)) for name, m in model.named_modules()],
        "parameters": [(name, id(p)) for name, p in model.named_parameters()],
        "buffers": [(name, id(b)) for name, b in model.named_buffers()],
        "config": model.config.to_dict(),
        "no_split": copy.copy(getattr(model, "_no_split_modules", None)),
    }


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("case", [*CASES, *DISCOVERED])
def test_remove_hyper_connections_gives_the_original_model_back(case: str) -> None:
    base = tiny_model(case) if case in CASES else build_tiny(case)
    ids = torch.randint(3, VOCAB, (2, 7))
    before, reference = _fingerprint(base), _logits(base, ids)
    model = hc_retrofit.convert(base, HCConfig(num_streams=4, variant="mhc"))
    assert hc_retrofit.is_converted(model)
    restored = hc_retrofit.remove_hyper_connections(model)
    assert restored is base
    assert not hc_retrofit.is_converted(restored)
    assert _fingerprint(restored) == before
    torch.testing.assert_close(_logits(restored, ids), reference, rtol=0, atol=0)
    again = hc_retrofit.convert(restored, HCConfig(num_streams=2, variant="dynamic"))  # and it converts again
    torch.testing.assert_close(_logits(again, ids), reference, rtol=1e-4, atol=1e-5)


def test_the_layer_class_says_what_it_is_and_is_listed_for_fsdp_and_device_map() -> None:
    base = tiny_model("llama-gqa-untied")
    original = type(decoder_layers(base)[0])
    model = hc_retrofit.convert(base, HCConfig())
    layer = decoder_layers(model)[0]
    assert type(layer).__name__ == f"HC{original.__name__}" and isinstance(layer, original)
    assert repr(layer).startswith(f"HC{original.__name__}(") and "hyper_connections" in repr(layer)
    assert f"HC{original.__name__}" in model._no_split_modules


def test_a_converted_model_round_trips_through_torch_save_in_this_and_a_new_process(tmp_path) -> None:
    model = hc_retrofit.convert(tiny_model("qwen2-tied"), HCConfig(variant="mhc"))
    for site in hc_retrofit.hyper_connection_sites(model):  # trained-looking, not the init
        with torch.no_grad():
            site.width_logits.add_(torch.randn_like(site.width_logits) * 0.1)
    ids = torch.randint(3, VOCAB, (2, 6))
    expected = _logits(model, ids)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(_logits(loaded, ids), expected, rtol=0, atol=0)
    assert type(decoder_layers(loaded)[0]).__name__.startswith("HC")
    path = tmp_path / "model.pt"
    torch.save({"model": model, "ids": ids, "expected": expected}, path)
    script = textwrap.dedent(
        f"""
        import torch
        saved = torch.load({str(path)!r}, weights_only=False)
        with torch.no_grad():
            got = saved["model"](saved["ids"]).logits
        assert torch.equal(got, saved["expected"]), (got - saved["expected"]).abs().max()
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


class _Wrapped(nn.Module):
    """A stand-in for a serving engine's or peft's replacement of a module: same function, new object."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs)


def _fresh_copy(module: nn.Module) -> nn.Module:
    """A new module computing the same function, without the hooks of the original (as an engine builds it)."""
    twin = copy.deepcopy(module)
    for m in twin.modules():
        for hooks in (m._forward_pre_hooks, m._forward_hooks):
            hooks.clear()
        m._forward_pre_hooks_with_kwargs.clear()
        m._forward_hooks_with_kwargs.clear()
    return twin


@pytest.mark.parametrize("case", ["llama-gqa-untied", "gemma2-sandwich", "gpt2"])
def test_site_hooks_follow_a_child_replaced_after_conversion(case: str) -> None:
    base = tiny_model(case)
    ids = torch.randint(3, VOCAB, (2, 7))
    reference = _logits(base, ids)
    model = hc_retrofit.convert(copy.deepcopy(base), HCConfig(num_streams=4, variant="mhc"))
    for site in hc_retrofit.hyper_connection_sites(model):  # make a dropped hook change the logits
        with torch.no_grad():
            site.depth_logits.add_(0.5)
    trained = _logits(model, ids)
    assert not torch.allclose(trained, reference, atol=1e-3)
    for layer in decoder_layers(model):
        for child in {hook.child for hook in layer._hc_surgery.hooks}:
            setattr(layer, child, _Wrapped(_fresh_copy(getattr(layer, child))))
    torch.testing.assert_close(_logits(model, ids), trained, rtol=1e-5, atol=1e-6)
    hc_retrofit.remove_hyper_connections(model)
    for layer in decoder_layers(model):
        assert all(not m._forward_pre_hooks and not m._forward_hooks for m in layer.modules())
    torch.testing.assert_close(_logits(model, ids), reference, rtol=1e-5, atol=1e-6)


def test_removal_undoes_a_conversion_that_failed_half_way(monkeypatch) -> None:
    from hc_retrofit.modeling import patch

    base = tiny_model("llama-gqa-untied")
    before = _fingerprint(base)
    calls = {"n": 0}
    real = patch.add_hook

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # in the middle of the second layer
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(patch, "add_hook", failing)
    with pytest.raises(RuntimeError, match="boom"):
        patch.apply_family(base, HCConfig())
    hc_retrofit.remove_hyper_connections(base)
    assert _fingerprint(base) == before
