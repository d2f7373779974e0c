"""hc_retrofit.convert proves every conversion on a probe batch; a wrong adapter is refused and undone."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

import hc_retrofit
from hc_retrofit import HCConfig, UnsupportedArchitectureError
from hc_retrofit.equivalence import ProbeOutputs, compare, probe_ids, probe_inputs, run_probe
from hc_retrofit.modeling.families import FAMILIES, PRE_NORM, STRUCTURE_KEY, Block, Family, Site, family_for
from tests.tiny import ENCODER_CASES, VOCAB, tiny_config, tiny_encoder, tiny_model

# Modules exist and the forward runs, but the function is not the original one: the second branch
# reads the layer's input instead of the stream after attention.
PARALLEL_ON_SEQUENTIAL = Family(
    ("llama",),
    "model.layers",
    Block("parallel", (Site(("input_layernorm", "post_attention_layernorm"), ("self_attn", "mlp")),)),
)
# Swapped branches: hooks on real modules, still the wrong function.
SWAPPED = Family(
    ("llama",),
    "model.layers",
    Block("sequential", (Site(("post_attention_layernorm",), ("mlp",)), Site(("input_layernorm",), ("self_attn",)))),
)
# Not even a layer list: applying it fails half-way.
NOT_A_LAYER_LIST = Family(("llama",), "model.embed_tokens", PRE_NORM)


def fingerprint(model: torch.nn.Module) -> dict:
    """Everything a conversion could leave behind."""
    return {
        "classes": [(name, type(m)) for name, m in model.named_modules()],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "hooks": sum(
            len(m._forward_pre_hooks) + len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules()
        ),
        "attributes": [(name, sorted(m.__dict__)) for name, m in model.named_modules()],
        "config": sorted(model.config.to_dict()),
        "training": [m.training for m in model.modules()],
    }


def assert_unchanged(model: torch.nn.Module, before: dict, ids: torch.Tensor, logits: torch.Tensor) -> None:
    after = fingerprint(model)
    assert after["classes"] == before["classes"]
    assert after["state"].keys() == before["state"].keys()
    assert all(torch.equal(after["state"][k], v) for k, v in before["state"].items())
    assert after["hooks"] == before["hooks"] == 0
    assert after["attributes"] == before["attributes"]
    assert after["config"] == before["config"]
    assert after["training"] == before["training"]
    assert not hc_retrofit.is_converted(model)
    assert not hasattr(model.config, STRUCTURE_KEY) and not hasattr(model.config, "hc_retrofit")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, logits)


@pytest.mark.parametrize(
    ("family", "reason"),
    [
        (PARALLEL_ON_SEQUENTIAL, r"max \|logit diff\|"),
        (SWAPPED, r"max \|logit diff\||greedy"),
        (NOT_A_LAYER_LIST, "failed"),
    ],
)
@pytest.mark.parametrize("variant", ["static", "mhc"])
def test_a_wrong_adapter_is_refused_and_the_model_left_as_it_was(family, reason, variant):
    model = tiny_model("llama-gqa-untied")
    model.model.layers[1].train()  # mixed train/eval flags must come back as they were
    ids = torch.randint(3, VOCAB, (2, 7))
    with torch.no_grad():
        logits = model(ids).logits
    before = fingerprint(model)
    with pytest.raises(UnsupportedArchitectureError) as info:
        hc_retrofit.convert(model, HCConfig(variant=variant), family=family)
    message = str(info.value)
    assert "'llama'" in message and "model is unchanged" in message and "tried 1" in message
    assert family.describe(model.config) in message
    assert re.search(reason, message), message
    assert "\n" not in message
    assert_unchanged(model, before, ids, logits)
    # and the right adapter still converts the very same model exactly afterwards
    converted = hc_retrofit.convert(model, HCConfig(variant=variant))
    with torch.no_grad():
        assert (converted(ids).logits - logits).abs().max() <= 1e-5


def test_a_proven_conversion_records_its_structure():
    model = hc_retrofit.convert(tiny_model("gpt_neox-sequential"), HCConfig())
    recorded = getattr(model.config, STRUCTURE_KEY)
    assert recorded == FAMILIES["gpt_neox"].to_dict(model.config)
    assert recorded["block"]["kind"] == "sequential"
    assert family_for(model.config).block_for(model.config) == FAMILIES["gpt_neox"].block_for(model.config)


def test_saved_checkpoints_rebuild_the_recorded_structure(tmp_path):
    model = hc_retrofit.convert(tiny_model("falcon-new-arch"), HCConfig(num_streams=2))
    hc_retrofit.save_converted(model, tmp_path / "out")
    loaded = hc_retrofit.load_converted(tmp_path / "out")
    assert getattr(loaded.config, STRUCTURE_KEY) == getattr(model.config, STRUCTURE_KEY)
    ids = torch.randint(3, VOCAB, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_the_probe_includes_a_cached_decode_step_and_restores_modes():
    model = tiny_model("qwen2-tied").train()
    ids = probe_ids(model)
    out = run_probe(model, ids)
    assert out.tokens is not None and out.tokens.shape == (ids.shape[0], 2)
    assert out.step_logits is not None and len(out.step_logits) == 2
    torch.testing.assert_close(out.step_logits[0], out.logits[:, -1])  # the prefill step is the last position
    assert all(m.training for m in model.modules())


def test_compare_catches_logits_tokens_and_cached_steps_separately():
    logits = torch.randn(2, 5, 11)
    steps = (torch.randn(2, 11), torch.randn(2, 11))
    tokens = torch.tensor([[1, 2], [3, 4]])
    ref = ProbeOutputs(logits, tokens, steps)
    assert compare(ref, ProbeOutputs(logits + 1e-6, tokens, steps), torch.float32) is None
    assert "logit diff" in compare(ref, ProbeOutputs(logits + 0.1, tokens, steps), torch.float32)
    assert "greedy" in compare(ref, ProbeOutputs(logits, tokens.flip(0), steps), torch.float32)
    wrong_step = (steps[0], steps[1] + 0.1)
    assert "cached decode step 1" in compare(ref, ProbeOutputs(logits, tokens, wrong_step), torch.float32)
    assert "cached decoding" in compare(ref, ProbeOutputs(logits, None, None, "generate() failed"), torch.float32)
    nan = logits.clone()
    nan[0, 0, 0] = float("nan")
    assert "logit diff" in compare(ref, ProbeOutputs(nan, tokens, steps), torch.float32)


def test_weights_on_the_meta_device_are_refused():
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_config("llama-gqa-untied"))
    with pytest.raises(UnsupportedArchitectureError, match="meta device"):
        hc_retrofit.convert(model, HCConfig())
    assert not hc_retrofit.is_converted(model)


# ----------------------------------------------------------------------------- encoders and vision
# The structure each encoder keeps: post-LN BERT / RoBERTa layers add their residual inside a
# submodule, then normalise, so the whole layer is the branch; pre-LN ViT / DeiT have two sites.
ENCODER_KINDS = {
    "bert-base": "layer",
    "bert-masked-lm": "layer",
    "roberta-masked-lm": "layer",
    "vit-base": "sequential",
    "vit-classifier": "sequential",
    "deit-classifier": "sequential",
    "modernbert-masked-lm": "sequential",
}


def _main_output(output) -> torch.Tensor:
    return output.logits if getattr(output, "logits", None) is not None else output.last_hidden_state


@pytest.mark.parametrize("variant", ["static", "dynamic", "mhc"])
@pytest.mark.parametrize("case", sorted(ENCODER_CASES))
def test_encoders_and_vision_models_convert_exactly(case, variant):
    base = tiny_encoder(case)
    model = hc_retrofit.convert(copy.deepcopy(base), HCConfig(variant=variant))
    structure = getattr(model.config, STRUCTURE_KEY)
    kinds = {b["kind"] for b in structure.get("layer_blocks") or [structure["block"]]}
    assert ENCODER_KINDS[case] in kinds and (kinds == {"layer"}) == (ENCODER_KINDS[case] == "layer")
    inputs = probe_inputs(base, batch=3, length=11, seed=5)  # not the batch the proof ran on
    with torch.no_grad():
        expected, got = base(**inputs), model(**inputs)
    assert (_main_output(got) - _main_output(expected)).abs().max() <= 1e-5
    if getattr(expected, "pooler_output", None) is not None:
        assert (got.pooler_output - expected.pooler_output).abs().max() <= 1e-5


def test_the_probe_batch_follows_the_model_input():
    encoder = probe_inputs(tiny_encoder("bert-base"))
    assert set(encoder) == {"input_ids", "attention_mask", "token_type_ids"}
    assert encoder["attention_mask"][1, -1] == 0 and encoder["attention_mask"][0].all()  # a padded row
    assert set(encoder["token_type_ids"].unique().tolist()) == {0, 1}  # two segments
    causal = probe_inputs(tiny_model("llama-gqa-untied"))
    assert set(causal) == {"input_ids", "attention_mask"} and causal["attention_mask"].all()
    image = probe_inputs(tiny_encoder("vit-classifier"))
    assert set(image) == {"pixel_values"} and image["pixel_values"].shape == (2, 3, 16, 16)
    assert run_probe(tiny_encoder("vit-classifier"), image).cache_note.endswith("cannot generate")


def test_a_wrong_adapter_on_a_vision_model_is_refused_and_undone():
    model = tiny_encoder("vit-classifier")
    pixels = probe_inputs(model)["pixel_values"]
    with torch.no_grad():
        logits = model(pixel_values=pixels).logits
    before = fingerprint(model)
    # swapped branches: hooks on real modules, shapes fine, the wrong function
    wrong = Family(
        ("vit",),
        "vit.layers",
        Block("sequential", (Site(("layernorm_after",), ("mlp",)), Site(("layernorm_before",), ("attention",)))),
    )
    with pytest.raises(UnsupportedArchitectureError, match=r"'vit'.*model is unchanged.*logit diff"):
        hc_retrofit.convert(model, HCConfig(), family=wrong)
    after = fingerprint(model)
    assert {k: v for k, v in after.items() if k != "state"} == {k: v for k, v in before.items() if k != "state"}
    assert after["state"].keys() == before["state"].keys()
    assert all(torch.equal(after["state"][k], v) for k, v in before["state"].items())
    with torch.no_grad():
        assert torch.equal(model(pixel_values=pixels).logits, logits)
