"""Nothing the user owns is lost by `train`: --overwrite, --resume and the NaN guard (issue 9)."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from pathlib import Path

import pytest

from hc_retrofit import outputs
from hc_retrofit.modeling.errors import HCRetrofitError
from hc_retrofit.train import NonFiniteLossError, TrainingError, train
from hc_retrofit.train import trainer as train_trainer
from hc_retrofit.train.checkpoint import STATE_FILE, list_checkpoints
from hc_retrofit.train.metrics import read_metrics

from .conftest import tiny_config, tiny_lm


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _run(tokenizer, corpus, cache_dir, out, **kw):
    return train(tiny_config(out, corpus, cache_dir, **kw), model=tiny_lm(tokenizer), tokenizer=tokenizer)


@pytest.mark.parametrize("target", ["unrelated", "data_dir", "cwd", "parent_of_cwd", "home"])
def test_overwrite_never_deletes_what_we_did_not_write(tokenizer, corpus, cache_dir, tmp_path, monkeypatch, target):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    data = data_dir / "corpus.txt"
    shutil.copy(corpus, data)
    unrelated = tmp_path / "photos"
    unrelated.mkdir()
    (unrelated / "cat.jpg").write_bytes(b"\xff\xd8 not really")
    work = tmp_path / "work" / "project"
    work.mkdir(parents=True)
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "work"))
    out = {
        "unrelated": unrelated,
        "data_dir": data_dir,
        "cwd": Path("."),
        "parent_of_cwd": Path(".."),
        "home": Path("~"),
    }[target]
    before = _tree(tmp_path)
    with pytest.raises(HCRetrofitError) as err:
        train(tiny_config(out, data, cache_dir, overwrite=True), model=tiny_lm(tokenizer), tokenizer=tokenizer)
    assert "\n" not in str(err.value)
    assert _tree(tmp_path) == before


def test_overwrite_replaces_our_run_only_once_the_new_one_is_complete(
    tokenizer, corpus, cache_dir, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    _run(tokenizer, corpus, cache_dir, out, max_steps=2)
    assert (out / outputs.MARKER).is_file() and outputs.is_ours(out)
    first = _tree(out)

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_trainer.Trainer, "save_checkpoint", boom)  # the new run dies before it is complete
    with pytest.raises(KeyboardInterrupt):
        _run(tokenizer, corpus, cache_dir, out, max_steps=3, overwrite=True)
    assert _tree(out) == first  # the old run is back, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    monkeypatch.undo()
    _run(tokenizer, corpus, cache_dir, out, max_steps=3, overwrite=True)
    assert json.loads((out / "summary.json").read_text())["steps"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # the set-aside copy is gone


def test_a_finished_run_continues_from_its_last_step(tokenizer, corpus, cache_dir, tmp_path):
    """The end of a run is checkpointed: ``--resume --max-steps N`` trains on from it, never re-trains."""
    out = tmp_path / "run"
    _run(tokenizer, corpus, cache_dir, out, max_steps=3, save_every=0)
    assert [s for s, _ in list_checkpoints(out)] == [3]
    before = _tree(out)
    with pytest.raises(TrainingError, match="complete"):
        _run(tokenizer, corpus, cache_dir, out, max_steps=3, save_every=0, resume=True)
    assert _tree(out) == before
    longer = _run(tokenizer, corpus, cache_dir, out, max_steps=5, save_every=0, resume=True)
    assert longer.start_step == 3 and longer.steps == 5
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [0, 1, 2, 3, 4]  # one curve, nothing re-trained
    assert [s for s, _ in list_checkpoints(out)] == [3, 5]


def test_resume_on_a_finished_run_without_checkpoints_changes_nothing(tokenizer, corpus, cache_dir, tmp_path):
    out = tmp_path / "run"
    _run(tokenizer, corpus, cache_dir, out, max_steps=3, save_every=0)
    shutil.rmtree(out / "checkpoints")  # removed by hand
    before = _tree(out)
    with pytest.raises(TrainingError, match="no checkpoint"):  # a longer run cannot continue without one
        _run(tokenizer, corpus, cache_dir, out, max_steps=5, save_every=0, resume=True)
    assert _tree(out) == before


def test_resume_refuses_a_max_steps_below_the_newest_checkpoint(tokenizer, corpus, cache_dir, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):  # killed after the step-4 checkpoint
        _killed_run(tokenizer, corpus, cache_dir, out)
    assert [s for s, _ in list_checkpoints(out)] == [2, 4]
    before = _tree(out)
    with pytest.raises(TrainingError, match="step 4"):
        _run(tokenizer, corpus, cache_dir, out, max_steps=3, save_every=2, resume=True)
    assert _tree(out) == before


def _killed_run(tokenizer, corpus, cache_dir, out):
    """A run that is interrupted right after writing its step-4 checkpoint."""
    from hc_retrofit.train import checkpoint as ckpt

    real = ckpt.save_checkpoint

    def save_then_die(accelerator, out_dir, step, state, **kwargs):
        path = real(accelerator, out_dir, step, state, **kwargs)
        if step == 4:
            raise KeyboardInterrupt
        return path

    ckpt.save_checkpoint = save_then_die
    try:
        _run(tokenizer, corpus, cache_dir, out, max_steps=8, save_every=2, keep_checkpoints=5)
    finally:
        ckpt.save_checkpoint = real


def test_resume_without_any_checkpoint_refuses_to_start_over(tokenizer, corpus, cache_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    outputs.write_marker(out, "run")
    (out / "metrics.jsonl").write_text('{"step": 0, "loss": 3.0}\n')
    before = _tree(out)
    with pytest.raises(TrainingError, match="nothing to resume"):
        _run(tokenizer, corpus, cache_dir, out, resume=True)
    assert _tree(out) == before


def test_resume_of_another_shape_is_refused_and_a_damaged_checkpoint_is_skipped(
    tokenizer, corpus, cache_dir, tmp_path, caplog
):
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        _killed_run(tokenizer, corpus, cache_dir, out)
    with pytest.raises(TrainingError, match="streams=4"):
        _run(tokenizer, corpus, cache_dir, out, max_steps=8, save_every=2, resume=True, streams=2)
    (list_checkpoints(out)[-1][1] / STATE_FILE).write_text("{ truncated")  # newest checkpoint damaged
    with caplog.at_level(logging.WARNING, logger="hc_retrofit"):
        result = _run(
            tokenizer, corpus, cache_dir, out, max_steps=8, save_every=2, keep_checkpoints=5, resume=True, seed=1
        )
    assert result.start_step == 2
    # a setting that only changes the run is a warning through the package's logger (not a print)
    assert any("seed 0, now 1" in r.getMessage() for r in caplog.records if r.name.startswith("hc_retrofit."))


@pytest.mark.parametrize(
    ("setting", "value"),
    [("lr", math.nan), ("lr", math.inf), ("lr", 1e30), ("hc_lr_multiplier", math.nan), ("max_grad_norm", math.nan)],
)
def test_non_finite_or_absurd_settings_are_refused_up_front(corpus, cache_dir, tmp_path, setting, value):
    with pytest.raises(TrainingError, match=setting):
        tiny_config(tmp_path / "run", corpus, cache_dir, **{setting: value}).validate()
    assert not (tmp_path / "run").exists()


def test_no_checkpoint_is_written_from_non_finite_weights(tokenizer, corpus, cache_dir, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = train_trainer.group_lrs

    def poison_on_third_step(optimizer):
        calls["n"] += 1
        if calls["n"] == 4:  # step 3: the weights go NaN in an update whose loss was finite
            optimizer.param_groups[0]["params"][0].data.fill_(math.nan)
        return real(optimizer)

    monkeypatch.setattr(train_trainer, "group_lrs", poison_on_third_step)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match="non-finite weights") as err:
        _run(tokenizer, corpus, cache_dir, out, max_steps=8, save_every=2, keep_checkpoints=5)
    assert [s for s, _ in list_checkpoints(out)] == [2]
    assert err.value.last_checkpoint == str(list_checkpoints(out)[0][1])
    assert not (out / "final").exists()


def test_partial_dirs_of_a_killed_save_are_cleaned_by_the_next_save(tmp_path):
    out = tmp_path / "ckpt"
    stale = tmp_path / ".ckpt.abc123.partial"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    fresh = outputs.staging_dir(out)
    assert not stale.exists() and fresh.is_dir() and os.listdir(tmp_path) == [fresh.name]


def test_on_the_fly_conversion_is_proven_and_reaches_discovered_families(tokenizer, corpus, cache_dir, tmp_path):
    """`train PLAIN_MODEL` converts through the proving convert: a family with no hand-written adapter trains too."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "gpt_neo",
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        attention_types=[[["global", "local"], 1]],
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    result = train(tiny_config(tmp_path / "run", corpus, cache_dir, max_steps=2), model=model, tokenizer=tokenizer)
    assert result.hc and "hc_retrofit_structure" in model.config.to_dict()
