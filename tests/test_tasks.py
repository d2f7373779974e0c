"""The tasks hc-retrofit converts, and which of them it trains."""

from __future__ import annotations

import pytest

import hc_retrofit
from hc_retrofit.tasks import (
    TASKS,
    auto_class,
    check_task,
    is_causal_lm,
    model_class_names,
    model_types,
    sees_future_tokens,
)
from tests.tiny import tiny_encoder, tiny_model


def test_each_task_names_its_auto_class_and_types():
    for task, (auto, _) in TASKS.items():
        assert auto_class(task).__name__ == auto
    assert {"bert", "roberta", "modernbert"} <= set(model_types("masked-lm"))
    assert {"vit", "deit"} <= set(model_types("image-classification"))
    assert "llama" in model_types("causal-lm") and "vit" not in model_types("causal-lm")
    assert model_class_names("image-classification", "deit")[0] == "DeiTForImageClassification"
    with pytest.raises(ValueError, match="unknown task 'nope': choose one of causal-lm"):
        check_task("nope")


def test_only_causal_lms_count_as_trainable():
    assert is_causal_lm(tiny_model("gpt2"))
    converted = hc_retrofit.convert(tiny_model("llama-gqa-untied"), hc_retrofit.HCConfig(num_streams=2))
    assert is_causal_lm(converted)  # through the converted layers' and models' subclasses
    assert not is_causal_lm(tiny_encoder("bert-masked-lm"))
    assert not is_causal_lm(tiny_encoder("vit-classifier"))


@pytest.mark.parametrize("is_decoder", [False, True])
def test_an_encoder_loaded_as_a_causal_lm_is_caught_seeing_later_tokens(is_decoder):
    from transformers import AutoConfig, AutoModelForCausalLM

    from tests.tiny import TEXT

    bert = AutoModelForCausalLM.from_config(AutoConfig.for_model("bert", is_decoder=is_decoder, **TEXT)).eval()
    assert is_causal_lm(bert)  # BertLMHeadModel is listed as a causal LM ...
    assert sees_future_tokens(bert) is not is_decoder  # ... but attends both ways unless it is a decoder
    assert not sees_future_tokens(tiny_model("llama-gqa-untied"))
