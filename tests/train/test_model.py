"""Getting the model to train: only causal LMs are trained."""

from __future__ import annotations

import pytest

from hc_retrofit.train.errors import TrainingError
from hc_retrofit.train.model import prepare_model
from hc_retrofit.train.recipe import TrainConfig
from tests.tiny import tiny_encoder


@pytest.mark.parametrize("case", ["bert-masked-lm", "vit-classifier"])
def test_encoders_and_vision_models_are_not_trained(case):
    model = tiny_encoder(case)
    with pytest.raises(TrainingError, match=r"not a causal LM: hc-retrofit trains causal LMs only") as info:
        prepare_model(TrainConfig(model="enc"), model, tokenizer=object())
    assert "\n" not in str(info.value)
