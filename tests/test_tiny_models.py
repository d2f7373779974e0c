"""Tiny configs of any model type: sizes under every spelling, left to the config where it refuses them."""

from __future__ import annotations

import pytest
from huggingface_hub.errors import StrictDataclassFieldValidationError
from transformers import CONFIG_MAPPING

from hc_retrofit import tiny_models


def test_hybrid_stacks_get_one_layer_of_each_kind():
    config = tiny_models.tiny_config("qwen3_next")
    assert list(config.layer_types) == ["linear_attention", "full_attention"]
    assert config.num_hidden_layers == 2


def test_a_derived_property_is_left_derived():
    """falcon's ``head_dim`` is a property without a setter: the tiny size is dropped, not forced."""
    head_dim = CONFIG_MAPPING["falcon"].__dict__["head_dim"]
    assert isinstance(head_dim, property) and head_dim.fset is None
    config = tiny_models.tiny_config("falcon")
    assert (config.hidden_size, config.num_attention_heads, config.head_dim) == (32, 4, 8)


def test_a_size_its_field_refuses_keeps_the_default():
    """segformer takes ``num_attention_heads`` per stage (a tuple): the tiny integer is refused on its
    own, so the default stays while the other sizes apply; asked for by the caller, it is not dropped."""
    segformer = CONFIG_MAPPING["segformer"]
    with pytest.raises(StrictDataclassFieldValidationError):
        segformer(num_attention_heads=4)
    config = tiny_models.tiny_config("segformer")
    assert config.num_attention_heads == segformer().num_attention_heads
    assert config.num_hidden_layers == 2 != segformer().num_hidden_layers
    with pytest.raises(StrictDataclassFieldValidationError):
        tiny_models.tiny_config("segformer", num_attention_heads=4)
