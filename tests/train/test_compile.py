"""``train --compile``: regional compilation of the decoder layers, same losses as eager.

The runs use the ``aot_eager`` backend (``compile_backend``): it traces forward and backward as
Inductor receives them, without minutes of C++ code generation on a CPU.
"""

from __future__ import annotations

import copy

import pytest
import torch

from hc_retrofit.modeling.patch import decoder_layers
from hc_retrofit.train import train
from hc_retrofit.train.compile import compile_layers
from hc_retrofit.train.errors import TrainingError
from hc_retrofit.train.metrics import read_metrics
from hc_retrofit.train.recipe import TrainConfig

from .conftest import tiny_config, tiny_lm


def _losses(out) -> list[float]:
    return [r["loss"] for r in read_metrics(out) if "loss" in r]


@pytest.mark.parametrize("no_hc", [False, True])
def test_compiled_training_matches_eager(tokenizer, corpus, cache_dir, tmp_path, no_hc):
    base = tiny_lm(tokenizer)
    settings = {"max_steps": 3, "no_hc": no_hc, "eval_batches": 1}
    eager = train(
        tiny_config(tmp_path / "eager", corpus, cache_dir, **settings), model=copy.deepcopy(base), tokenizer=tokenizer
    )
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = train(
        tiny_config(tmp_path / "compiled", corpus, cache_dir, compile=True, compile_backend="aot_eager", **settings),
        model=copy.deepcopy(base),
        tokenizer=tokenizer,
    )
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # it did compile
    assert compiled.hc == (not no_hc)
    for a, b in zip(_losses(tmp_path / "eager"), _losses(tmp_path / "compiled"), strict=True):
        assert a == pytest.approx(b, abs=1e-4)
    assert compiled.final_eval_loss == pytest.approx(eager.final_eval_loss, abs=1e-4)


def test_compile_layers_compiles_every_layer_in_place_keeping_names(tokenizer):
    import hc_retrofit

    model = hc_retrofit.convert(tiny_lm(tokenizer), hc_retrofit.HCConfig(num_streams=4, variant="dynamic"))
    names = [n for n, _ in model.named_parameters()]
    x = torch.randint(3, len(tokenizer), (2, 16))
    expected = model(x, labels=x).loss
    torch._dynamo.reset()
    assert compile_layers(model, backend="aot_eager") == len(decoder_layers(model))
    assert [n for n, _ in model.named_parameters()] == names
    torch.testing.assert_close(model(x, labels=x).loss, expected)
    with pytest.raises(ValueError, match="unknown compile backend"):
        compile_layers(model, backend="tensorrt")


def test_a_bad_compile_backend_is_refused():
    with pytest.raises(TrainingError, match="compile_backend"):
        TrainConfig(data="d", out="o", compile_backend="nope").validate()


def test_the_compile_flag_reaches_train_and_every_compare_run(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    import hc_retrofit.cli.commands  # (registers the commands)
    import hc_retrofit.compare
    import hc_retrofit.train
    from hc_retrofit.cli.app import app

    seen: dict = {}

    def fake_train(cfg):
        seen["train"] = cfg
        raise TrainingError("stop here")

    def fake_compare(spec, **_):
        seen["compare"] = spec
        raise TrainingError("stop here")

    monkeypatch.setattr(hc_retrofit.train, "train", fake_train)
    monkeypatch.setattr(hc_retrofit.compare, "run_compare", fake_compare)
    runner = CliRunner()
    out = str(tmp_path / "o")
    runner.invoke(app, ["train", "m", "--data", "d", "--out", out, "--compile"])
    assert seen["train"].compile is True and seen["train"].compile_backend == "inductor"
    runner.invoke(app, ["train", "m", "--data", "d", "--out", out])
    assert seen["train"].compile is False
    runner.invoke(app, ["compare", "m", "--data", "d", "--out", out, "--compile"])
    spec = seen["compare"]
    assert all(spec.trial_config(trial).compile for trial in spec.grid_trials())
