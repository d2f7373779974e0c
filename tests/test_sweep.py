"""The coverage sweep on a representative handful of model types (the whole sweep is
`hc-retrofit architectures --check`, minutes)."""

from __future__ import annotations

import pytest

from hc_retrofit import sweep
from hc_retrofit.modeling.config import VARIANTS

# model type -> what the kept structure must say: a hand-written-free pre-norm decoder (gemma,
# olmo), a post-LN-like layer whose residual add is inside the attention module (bloom), local/
# global attention (gpt_neo), a state-space model with its own cache (mamba) and a post-LN block
# that returns a list instead of a tuple (openai-gpt).
EXACT = {
    "openai-gpt": "layer [F(h) = layer(h) - h]",
    "gemma": "sequential [input_layernorm -> self_attn; post_attention_layernorm -> mlp]",
    "olmo": "sequential [input_layernorm -> self_attn; post_attention_layernorm -> mlp]",
    "bloom": "layer [F(h) = layer(h) - h]",
    "gpt_neo": "sequential [ln_1 -> attn; ln_2 -> mlp]",
    "mamba": "sequential [norm -> mixer]",
}


@pytest.mark.parametrize("model_type", sorted(EXACT))
def test_representative_types_convert_exactly_with_every_variant(model_type):
    row = sweep.sweep_one(model_type, VARIANTS)
    assert row.outcome == "exact", row.detail
    assert row.detail.endswith(EXACT[model_type])


def test_a_looping_stack_is_refused_with_the_reason():
    row = sweep.sweep_one("dory", ("mhc",))
    assert row.outcome == "refused"
    assert "cannot convert 'dory' exactly" in row.detail and "called [2, 2] times" in row.detail


def test_a_model_without_whole_layers_is_refused_with_the_reason():
    """XLM keeps its attentions, norms and MLPs in four parallel ModuleLists: no module is a layer."""
    row = sweep.sweep_one("xlm", ("mhc",))
    assert row.outcome == "refused"
    assert "transformer.attentions: the hidden states change between entries 0 and 1" in row.detail
    assert "not whole layers" in row.detail


def test_a_type_that_cannot_be_built_tiny_is_reported_as_such():
    row = sweep.sweep_one("xlnet", ("mhc",))
    assert row.outcome == "no tiny" and "xlnet" in row.detail


@pytest.mark.parametrize(
    ("task", "model_type", "structure"),
    [
        ("masked-lm", "bert", "bert.encoder.layer: layer [F(h) = layer(h) - h]"),
        (
            "image-classification",
            "vit",
            "vit.layers: sequential [layernorm_before -> attention; layernorm_after -> mlp]",
        ),
        ("base", "deit", "layers: sequential [layernorm_before -> attention; layernorm_after -> mlp]"),
    ],
)
def test_other_tasks_build_their_own_models(task, model_type, structure):
    row = sweep.sweep_one(model_type, ("static", "mhc"), task=task)
    assert (row.outcome, row.detail) == ("exact", structure)
    assert row.variants == {"static": "exact", "mhc": "exact"}


def test_the_row_says_which_variant_gave_what(monkeypatch):
    from hc_retrofit import proof
    from hc_retrofit.modeling.errors import UnsupportedArchitectureError

    real = proof.convert

    def no_mhc(model, config):
        if config.variant == "mhc":
            raise UnsupportedArchitectureError("no mhc here")
        return real(model, config)

    monkeypatch.setattr(proof, "convert", no_mhc)
    row = sweep.sweep_one("gpt2", VARIANTS)
    assert row.outcome == "refused"  # a type is exact only when every variant is
    assert row.variants == {"static": "exact", "dynamic": "exact", "mhc": "refused"}
    assert row.detail == (
        "static, dynamic: exact (transformer.h: sequential [ln_1 -> attn; ln_2 -> mlp]); mhc: refused (no mhc here)"
    )


def test_coverage_and_the_readme_table():
    rows = [
        sweep.SweepRow("a", "exact", "model.layers: sequential [x -> y]"),
        sweep.SweepRow("b", "exact", "h: layer [F(h) = layer(h) - h]"),
        sweep.SweepRow("c", "refused", "mhc: cannot convert 'c' exactly | why"),
        sweep.SweepRow("d", "no tiny", "ValueError: needs a vision config"),
    ]
    summary = sweep.coverage(rows)
    assert summary["built"] == 3 and summary["exact"] == 2 and summary["exact_share"] == pytest.approx(2 / 3)
    table = sweep.markdown(rows)
    assert "**2 of 3 causal-LM types that build as tiny random models convert exactly (66.7%)**" in table
    assert "| c | refused | mhc: cannot convert 'c' exactly \\| why |" in table
    assert "masked-LM types" in sweep.markdown(rows, task="masked-lm")
    assert table.index("| a |") < table.index("| c |") < table.index("| d |")


def test_a_timeout_is_not_swallowed_as_a_refusal():
    """convert turns any Exception of a candidate into a refusal; a sweep timeout must get through."""

    def swallowing_loop():
        while True:
            try:
                sum(range(1000))
            except Exception:  # what hc_retrofit.proof._try does with a failing candidate
                return "refused"

    with pytest.raises(sweep.SweepTimeout), sweep.time_limit(0.2):
        swallowing_loop()


def test_the_memory_cap_turns_a_huge_allocation_into_an_error():
    import torch

    with sweep.memory_limit(4.0), pytest.raises((MemoryError, RuntimeError)):
        torch.empty(8 * 2**30, dtype=torch.uint8)
