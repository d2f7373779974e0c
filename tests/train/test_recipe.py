"""YAML recipes and flag precedence."""

from __future__ import annotations

import pytest

from hc_retrofit.train.errors import TrainingError
from hc_retrofit.train.recipe import DEFAULT_HC_LR_MULTIPLIER, TrainConfig, command_line_config, load_recipe, merge
from hc_retrofit.train.threads import default_threads


def test_flags_override_recipe_which_overrides_defaults(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("max-steps: 50\nlr: 3e-4\nbatch_size: 4\nreport_to: tensorboard\ngrad_checkpointing: true\n")
    cfg = merge(recipe, batch_size=16, data="d.txt", out="o", lr=None)
    assert cfg.max_steps == 50 and cfg.batch_size == 16
    assert cfg.lr == pytest.approx(3e-4) and isinstance(cfg.lr, float)  # YAML 1.1 reads 3e-4 as a string
    assert cfg.report_to == ["tensorboard"] and cfg.grad_checkpointing is True
    assert cfg.hc_lr_multiplier == DEFAULT_HC_LR_MULTIPLIER
    cfg.validate()


def test_a_switch_not_given_keeps_the_recipes_value_and_threads_default_to_a_share(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("grad_checkpointing: true\nthreads: 3\n")
    cfg = command_line_config(recipe, grad_checkpointing=False, compile=True, max_steps=None, batch_size=2)
    assert cfg.grad_checkpointing is True and cfg.compile is True  # a switch only switches on
    assert cfg.threads == 3 and cfg.batch_size == 2 and cfg.max_steps == TrainConfig().max_steps
    assert cfg.progress is True and command_line_config(progress=False).progress is False
    assert command_line_config().threads == default_threads()  # the Python API's default is None
    assert TrainConfig().threads is None


def test_unknown_recipe_key_is_an_error(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("max_step: 50\n")
    with pytest.raises(TrainingError, match=r"unknown key.*max_step.*known keys"):
        load_recipe(recipe)


def test_bad_values_are_clear_errors(tmp_path):
    with pytest.raises(TrainingError, match="max_steps must be of type int"):
        merge(max_steps="many")
    with pytest.raises(TrainingError, match="no data given"):
        TrainConfig(out="o").validate()
    with pytest.raises(TrainingError, match="variant"):
        TrainConfig(data="d", out="o", variant="wide").validate()
    with pytest.raises(TrainingError, match="no-hc"):
        TrainConfig(data="d", out="o", no_hc=True, hc_warmup_steps=3).validate()
    with pytest.raises(TrainingError, match=r"residual_init_main.*no-hc"):
        TrainConfig(data="d", out="o", no_hc=True, residual_init_main=0.7).validate()
    with pytest.raises(TrainingError, match=r"residual_init_main must be in \(1/num_streams, 1\)"):
        TrainConfig(data="d", out="o", streams=4, residual_init_main=0.2).validate()
    with pytest.raises(TrainingError, match="width_init_main must be in"):
        merge(data="d", out="o", width_init_main="1.5").validate()


@pytest.mark.parametrize(("streams", "message"), [(1, "num_streams must be >= 2"), (65, "num_streams must be <= 64")])
def test_streams_follow_the_rules_of_hc_config(streams, message):
    """train accepts exactly the settings convert accepts: HCConfig's rules, not a copy of them."""
    with pytest.raises(TrainingError, match=message):
        TrainConfig(data="d", out="o", streams=streams).validate()
    assert TrainConfig(data="d", out="o", streams=2, variant="static").validate().hc_config().num_streams == 2


@pytest.mark.parametrize(("name", "expected"), [("float32", "float32"), ("fp32", "float32"), ("bf16", "bfloat16")])
def test_model_dtype_names_are_the_convert_names_and_their_aliases(name, expected):
    import torch

    from hc_retrofit.dtypes import parse_dtype
    from hc_retrofit.train.model import resolve_dtype

    assert resolve_dtype(name) == parse_dtype(name) == getattr(torch, expected)


@pytest.mark.parametrize("name", ["float16", "auto", "f32"])
def test_model_dtype_refuses_what_cannot_be_trained(name):
    from hc_retrofit.train.model import resolve_dtype

    with pytest.raises(TrainingError, match=r"model_dtype must be one of float32, bfloat16"):
        resolve_dtype(name)


def test_shipped_recipes_are_valid():
    from pathlib import Path

    recipes = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))
    assert recipes, "recipes/*.yaml should exist"
    for path in recipes:
        cfg = merge(path, data="d.txt", out="o", model="m")
        cfg.validate()
