"""The training loop on a tiny llama: exact start, learning, --no-hc, resume equality, NaN guard."""

from __future__ import annotations

import copy

import pytest
import torch

import hc_retrofit
from hc_retrofit.train import NonFiniteLossError, train
from hc_retrofit.train.checkpoint import latest_checkpoint, list_checkpoints
from hc_retrofit.train.data import BatchSchedule, build_data
from hc_retrofit.train.metrics import read_metrics

from .conftest import tiny_config, tiny_lm


def _train_rows(out):
    return [r for r in read_metrics(out) if "loss" in r]


def test_step0_is_the_base_model_and_loss_decreases(tokenizer, corpus, cache_dir, tmp_path):
    base = tiny_lm(tokenizer)
    cfg = tiny_config(tmp_path / "run", corpus, cache_dir, max_steps=12, eval_every=6, lr=1e-2)
    result = train(cfg, model=copy.deepcopy(base), tokenizer=tokenizer)

    # the base model's loss on the first training batch, computed independently
    data = build_data(corpus, tokenizer, 32, eval_fraction=0.1, cache_dir=cache_dir)
    x = data.train[BatchSchedule(len(data.train), 2, seed=0).indices(0)]["input_ids"]
    with torch.no_grad():
        base_loss = base(input_ids=x, labels=x).loss.item()
    rows = _train_rows(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(12))
    assert rows[0]["loss"] == pytest.approx(base_loss, abs=1e-5)  # exact retrofit: no spike
    assert result.hc and result.step0_loss == rows[0]["loss"]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert all(r["hc_lr"] == pytest.approx(cfg.hc_lr_multiplier * r["lr"]) for r in rows)
    evals = [r for r in read_metrics(tmp_path / "run") if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 6, 12]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 0.05
    assert sum(r["loss"] for r in rows[-3:]) < sum(r["loss"] for r in rows[:3])
    # the final model is a converted checkpoint that reloads to the trained weights
    from hc_retrofit.loading import load_converted

    final = load_converted(result.final_dir)
    assert hc_retrofit.is_converted(final)
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000


def test_no_hc_trains_the_same_model_plainly(tokenizer, corpus, cache_dir, tmp_path):
    base = tiny_lm(tokenizer)
    plain = train(
        tiny_config(tmp_path / "plain", corpus, cache_dir, no_hc=True, max_steps=3),
        model=copy.deepcopy(base),
        tokenizer=tokenizer,
    )
    hc = train(
        tiny_config(tmp_path / "hc", corpus, cache_dir, max_steps=3), model=copy.deepcopy(base), tokenizer=tokenizer
    )
    assert not plain.hc and hc.hc
    assert plain.step0_loss == pytest.approx(hc.step0_loss, abs=1e-5)  # same start, same first batch
    assert "hc_lr" not in _train_rows(tmp_path / "plain")[0]
    assert (tmp_path / "plain" / "final" / "model.safetensors").exists()
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(plain.final_dir)
    assert not hc_retrofit.is_converted(reloaded)


def test_hc_warmup_freezes_the_base(tokenizer, corpus, cache_dir, tmp_path):
    model = hc_retrofit.convert(tiny_lm(tokenizer))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(
        tiny_config(tmp_path / "w", corpus, cache_dir, max_steps=2, hc_warmup_steps=2), model=model, tokenizer=tokenizer
    )
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) != ("hyper_connections" in name), name


def test_hc_init_settings_convert_with_that_init_and_stay_exact(tokenizer, corpus, cache_dir, tmp_path):
    """``width_init_main`` / ``residual_init_main`` reach the conversion; the start is still the base model."""
    base = tiny_lm(tokenizer)
    results = {}
    for name, extra in (("plain", dict(no_hc=True)), ("init", dict(width_init_main=0.7, residual_init_main=0.6))):
        cfg = tiny_config(tmp_path / name, corpus, cache_dir, max_steps=1, **extra)
        results[name] = train(cfg, model=copy.deepcopy(base), tokenizer=tokenizer)
    assert results["init"].step0_loss == pytest.approx(results["plain"].step0_loss, abs=1e-5)
    assert results["init"].initial_eval_loss == pytest.approx(results["plain"].initial_eval_loss, abs=1e-5)
    from hc_retrofit.loading import load_converted

    hc_config = load_converted(results["init"].final_dir).hc_config
    assert (hc_config.width_init_main, hc_config.residual_init_main) == (0.7, 0.6)


class _Interrupt(Exception):
    pass


def _fail_on_training_call(model, call: int, *, nan: bool = False):
    """Make the ``call``-th training forward raise (a crash) or return NaN logits."""
    count = {"n": 0}

    def hook(module, args, output):
        if not module.training:
            return output
        count["n"] += 1
        if count["n"] == call:
            if not nan:
                raise _Interrupt
            return output * float("nan")
        return output

    return model.lm_head.register_forward_hook(hook)


def test_resume_reproduces_the_uninterrupted_run(tokenizer, corpus, cache_dir, tmp_path):
    kw = dict(max_steps=7, save_every=2, eval_every=3)
    train(tiny_config(tmp_path / "ref", corpus, cache_dir, **kw), model=tiny_lm(tokenizer), tokenizer=tokenizer)

    crashed = tiny_lm(tokenizer)
    _fail_on_training_call(crashed, 6)  # dies during step 5, after the step-4 checkpoint
    with pytest.raises(_Interrupt):
        train(tiny_config(tmp_path / "run", corpus, cache_dir, **kw), model=crashed, tokenizer=tokenizer)
    assert latest_checkpoint(tmp_path / "run")[0] == 4
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [2, 4]  # keep_checkpoints=2
    resumed = train(
        tiny_config(tmp_path / "run", corpus, cache_dir, resume=True, **kw),
        model=tiny_lm(tokenizer, seed=1),
        tokenizer=tokenizer,
    )
    assert resumed.start_step == 4
    ref_rows, run_rows = read_metrics(tmp_path / "ref"), read_metrics(tmp_path / "run")
    assert [r["step"] for r in run_rows] == [r["step"] for r in ref_rows]  # one clean curve, no duplicates
    for a, b in zip(ref_rows, run_rows, strict=True):
        for key in ("loss", "eval_loss", "lr", "hc_lr"):
            assert a.get(key) == b.get(key), (a, b)
    from safetensors.torch import load_file

    w_ref = load_file(tmp_path / "ref" / "final" / "model.safetensors")
    w_run = load_file(tmp_path / "run" / "final" / "model.safetensors")
    assert w_ref.keys() == w_run.keys() and all(torch.equal(w_ref[k], w_run[k]) for k in w_ref)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tokenizer, corpus, cache_dir, tmp_path):
    model = tiny_lm(tokenizer)
    _fail_on_training_call(model, 4, nan=True)  # step 3
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) at step 3.*step-00000002.*--resume") as info:
        train(
            tiny_config(tmp_path / "nan", corpus, cache_dir, max_steps=8, save_every=2),
            model=model,
            tokenizer=tokenizer,
        )
    assert info.value.step == 3 and info.value.last_checkpoint.endswith("step-00000002")
    assert [s for s, _ in list_checkpoints(tmp_path / "nan")] == [2]
    assert not (tmp_path / "nan" / "final").exists()
    assert read_metrics(tmp_path / "nan")[-1]["error"].startswith("non-finite loss")


def test_existing_out_dir_needs_resume_or_overwrite(tokenizer, corpus, cache_dir, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "x").write_text("mine")
    from hc_retrofit.train import TrainingError

    with pytest.raises(TrainingError, match=r"--resume.*--overwrite"):
        train(tiny_config(out, corpus, cache_dir), model=tiny_lm(tokenizer), tokenizer=tokenizer)


def test_grad_accum_and_checkpointing_match_one_big_batch(tokenizer, corpus, cache_dir, tmp_path):
    big = train(
        tiny_config(tmp_path / "big", corpus, cache_dir, batch_size=4, max_steps=3, eval_batches=None),
        model=tiny_lm(tokenizer),
        tokenizer=tokenizer,
    )
    acc = train(
        tiny_config(
            tmp_path / "acc",
            corpus,
            cache_dir,
            batch_size=2,
            grad_accum=2,
            grad_checkpointing=True,
            max_steps=3,
            eval_batches=None,
        ),
        model=tiny_lm(tokenizer),
        tokenizer=tokenizer,
    )
    assert big.tokens_per_step == acc.tokens_per_step
    for a, b in zip(_train_rows(tmp_path / "big"), _train_rows(tmp_path / "acc"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    assert acc.final_eval_loss == pytest.approx(big.final_eval_loss, abs=1e-4)


def test_real_checkpoint_on_real_text_starts_at_the_base_loss(shared_dir, cache_dir, tmp_path):
    """stories260K (a trained llama) converted on the fly, 2 steps on Shakespeare: step 0 is the base."""
    text = (shared_dir / "data" / "tinyshakespeare.txt").read_text()[:30_000]
    data_file = tmp_path / "shakespeare.txt"
    data_file.write_text(text)
    model_dir = str(shared_dir / "models" / "stories260K")
    cfg = tiny_config(tmp_path / "real", data_file, cache_dir, model=model_dir, block_size=64, max_steps=2, lr=1e-3)
    result = train(cfg)
    from hc_retrofit.base_model import load_base_model

    base, tok = load_base_model(model_dir, dtype=torch.float32)
    data = build_data(data_file, tok, 64, eval_fraction=0.1, cache_dir=cache_dir)
    x = data.train[BatchSchedule(len(data.train), 2, seed=0).indices(0)]["input_ids"]
    with torch.no_grad():
        assert result.step0_loss == pytest.approx(base(input_ids=x, labels=x).loss.item(), abs=1e-5)
    assert result.hc and 2.0 < result.step0_loss < 8.0  # a trained model, off-domain
