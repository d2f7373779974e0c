"""Discovery derives each hand-written family from the model alone, and its proposals are proven."""

from __future__ import annotations

import copy

import pytest
import torch

import hc_retrofit
from hc_retrofit import HCConfig
from hc_retrofit.discovery import discover, layer_stack_candidates
from hc_retrofit.equivalence import probe_ids
from hc_retrofit.modeling.families import FAMILIES, STRUCTURE_KEY, Block, family_for
from tests.tiny import CASES, VOCAB, tiny_model

# Discovery cannot know these from one forward; that is why they stay hand-written.
NEEDS_HAND_WRITTEN = {"granite-multipliers": "a config multiplier scales each branch before the add"}


@pytest.mark.parametrize("case", [c for c in CASES if c not in NEEDS_HAND_WRITTEN])
def test_discovery_agrees_with_each_hand_written_family(case):
    model = tiny_model(case)
    candidates, notes = discover(model, probe_ids(model))
    assert not notes
    hand = FAMILIES[model.config.model_type]
    assert candidates[0].to_dict(model.config) == hand.to_dict(model.config)
    assert candidates[-1].block_for(model.config) == Block("layer")  # the fallback is always offered


@pytest.mark.parametrize("case", sorted(NEEDS_HAND_WRITTEN))
def test_what_discovery_cannot_know_falls_back_to_the_whole_layer(case):
    model = tiny_model(case)
    candidates, _ = discover(model, probe_ids(model))
    assert [c.block_for(model.config).kind for c in candidates] == ["layer"]
    # ... which is still proven exact, so even without its Family the model would convert
    base = copy.deepcopy(model)
    converted = hc_retrofit.convert(model, HCConfig(), family=candidates[0])
    ids = torch.randint(3, VOCAB, (2, 9))
    with torch.no_grad():
        assert (converted(ids).logits - base(ids).logits).abs().max() <= 1e-4


@pytest.mark.parametrize(
    "case", ["llama-gqa-untied", "gpt_neox-parallel", "gemma2-sandwich", "olmo2", "falcon-new-arch"]
)
def test_without_its_family_a_known_model_converts_through_discovery(case, monkeypatch):
    base = tiny_model(case)
    hand = FAMILIES[base.config.model_type]
    monkeypatch.delitem(FAMILIES, base.config.model_type)
    model = hc_retrofit.convert(copy.deepcopy(base), HCConfig())
    assert family_for(model.config).to_dict(model.config) == hand.to_dict(base.config)
    ids = torch.randint(3, VOCAB, (2, 9))
    with torch.no_grad():
        assert (model(ids).logits - base(ids).logits).abs().max() <= 1e-4


def test_layer_stack_is_the_list_with_num_layers_no_split_entries():
    model = tiny_model("gpt2")
    assert layer_stack_candidates(model)[0] == "transformer.h"
    assert layer_stack_candidates(tiny_model("opt-post-ln"))[0] == "model.decoder.layers"


def test_a_model_without_a_layer_stack_is_refused_with_the_reason():
    class NoStack(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = copy.deepcopy(tiny_model("llama-gqa-untied").config)
            self.config.model_type = "not_a_known_type"
            self.emb = torch.nn.Embedding(VOCAB, 32)

        def forward(self, input_ids, attention_mask=None):
            return (self.emb(input_ids),)

        def get_input_embeddings(self):
            return self.emb

    model = NoStack()
    with pytest.raises(hc_retrofit.UnsupportedArchitectureError, match=r"'not_a_known_type'.*no ModuleList"):
        hc_retrofit.convert(model, HCConfig())
    assert not hc_retrofit.is_converted(model)


def test_the_discovered_structure_is_recorded_and_reloads(tmp_path, monkeypatch):
    base = tiny_model("olmo2")
    monkeypatch.delitem(FAMILIES, "olmo2")
    model = hc_retrofit.convert(copy.deepcopy(base), HCConfig(num_streams=2))
    assert getattr(model.config, STRUCTURE_KEY)["block"]["kind"] == "post_norm"
    hc_retrofit.save_converted(model, tmp_path / "out")
    loaded = hc_retrofit.load_converted(tmp_path / "out")  # no hand-written olmo2 family exists now
    ids = torch.randint(3, VOCAB, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, base(ids).logits, atol=1e-4, rtol=1e-4)


def test_an_empty_pre_norm_slot_is_a_sequential_block_not_post_norm():
    from tests.tiny import tiny_encoder

    base = tiny_encoder("modernbert-masked-lm")  # layer 0's attn_norm is nn.Identity (the embeddings are normed)
    assert isinstance(base.model.layers[0].attn_norm, torch.nn.Identity)
    model = hc_retrofit.convert(copy.deepcopy(base), HCConfig(num_streams=2))
    structure = getattr(model.config, STRUCTURE_KEY)
    assert "layer_blocks" not in structure  # one block for every layer now, the first included
    assert structure["block"]["kind"] == "sequential"
