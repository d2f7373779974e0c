"""FSDP2 for real: two CPU processes (gloo) under `accelerate launch` with recipes/accelerate/fsdp_cpu.yaml.

The product path, as a user runs it: ``accelerate launch --config_file <recipe> -m hc_retrofit train``
(the launcher from this interpreter, ``python -m accelerate.commands.launch``). It trains a
converted model a few steps and checks: the run records that FSDP2 ran and that each process held
about half of the parameters; the mid-run checkpoint is sharded (one ``.distcp`` file per rank);
the loss of each step equals a 1-process run with the same global batch; the final save is one
gathered checkpoint that `verify --trained` reads, holding the same weights as the 1-process
run's; and a run resumed (``--resume``) from the sharded checkpoint ends where the uninterrupted
run ends (the same losses and final weights).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hc_retrofit.loading import load_converted
from hc_retrofit.modeling.config import HCConfig
from hc_retrofit.streaming import stream_convert
from hc_retrofit.train import train
from hc_retrofit.train.checkpoint import list_checkpoints
from hc_retrofit.train.metrics import read_metrics

from .conftest import free_port, tiny_config, tiny_lm

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch"]


def _assert_same_weights(got_dir: Path, want_dir: Path, atol: float) -> None:
    got = load_converted(got_dir).state_dict()
    want = load_converted(want_dir).state_dict()
    assert got.keys() == want.keys()
    for key in got:
        torch.testing.assert_close(got[key], want[key], atol=atol, rtol=0, msg=key)


@pytest.mark.slow
def test_the_fsdp_recipe_shards_and_matches_one_process(tokenizer, corpus, cache_dir, tmp_path):
    plain, converted = tmp_path / "plain", tmp_path / "converted"
    tiny_lm(tokenizer).save_pretrained(plain)
    tokenizer.save_pretrained(plain)
    stream_convert(str(plain), converted, HCConfig(num_streams=4, variant="mhc"))  # records its base for verify
    out = tmp_path / "fsdp"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }

    def launch(run_dir: Path, *extra: str) -> None:
        cmd = [
            *LAUNCH, "--config_file", str(ROOT / "recipes" / "accelerate" / "fsdp_cpu.yaml"),
            "--main_process_port", str(free_port()), "-m", "hc_retrofit",
            "train", str(converted), "--data", str(corpus), "--out", str(run_dir), "--block-size", "32",
            "--batch-size", "2", "--max-steps", "3", "--lr", "3e-3", "--warmup-steps", "1", "--eval-every", "2",
            "--eval-batches", "2", "--eval-fraction", "0.1", "--save-every", "2", "--cache-dir", cache_dir,
            "--no-progress", *extra,
        ]  # fmt: skip
        proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]

    launch(out)

    # one gloo group of two processes, FSDP2 as the recipe says, every parameter sharded across them
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["num_processes"], summary["strategy"]) == (2, "fsdp2")
    assert 0.4 < summary["local_parameter_fraction"] < 0.6
    (_, checkpoint), *_ = list_checkpoints(out)  # a sharded save_state mid-run
    shards = sorted(p.name for p in checkpoint.rglob("*.distcp"))
    assert len(shards) >= 2 and {"__0_0.distcp", "__1_0.distcp"} <= set(shards)
    assert sorted(p.name for p in checkpoint.glob("random_states_*.pkl")) == [
        "random_states_0.pkl",
        "random_states_1.pkl",
    ]

    # FSDP averages gradients: 2 processes x batch 2 == 1 process x batch 4 (same samples per step)
    single = tmp_path / "single"
    train(tiny_config(single, corpus, cache_dir, model=str(converted), batch_size=4, max_steps=3, eval_every=2))
    rows, rows_one = read_metrics(out), read_metrics(single)
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 3
    assert losses == pytest.approx([r["loss"] for r in rows_one if "loss" in r], abs=1e-5)
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert evals == pytest.approx([r["eval_loss"] for r in rows_one if "eval_loss" in r], abs=1e-5)

    # the final save is one gathered checkpoint: verify --trained reads it; same weights as one process
    from typer.testing import CliRunner

    import hc_retrofit.cli.commands  # noqa: F401  (registers the commands)
    from hc_retrofit.cli.app import app

    verify = CliRunner().invoke(app, ["verify", str(out / "final"), "--trained", "--json"])
    assert verify.exit_code == 0, verify.output[-2000:]
    report = json.loads(verify.stdout)
    assert report["trained"] and report["max_abs_logit_diff"] > 0  # it learned, and was compared with its base
    assert not list((out / "final").glob("*.distcp")) and (out / "final" / "model.safetensors").is_file()
    _assert_same_weights(out / "final", single / "final", atol=1e-4)

    # interrupted after the sharded checkpoint at step 2 (what a crash in step 2 leaves), then --resume:
    # the same loss curve and the same final weights as the uninterrupted run
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed, ignore=shutil.ignore_patterns("final", "summary.json", "loss.png", "step-00000003"))
    rows_cut = [r for r in read_metrics(out) if r.get("step", 0) < 2]
    (resumed / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows_cut))
    launch(resumed, "--resume")
    assert json.loads((resumed / "summary.json").read_text())["start_step"] == 2
    rows_resumed = read_metrics(resumed)
    assert [r["step"] for r in rows_resumed] == [r["step"] for r in rows]
    for a, b in zip(rows_resumed, rows, strict=True):
        for key in ("loss", "eval_loss"):
            if key in b:
                assert a[key] == pytest.approx(b[key], abs=1e-5), (key, a["step"])
    _assert_same_weights(resumed / "final", out / "final", atol=1e-5)


def test_the_gathered_copy_of_a_model_converted_on_the_fly_uses_its_recorded_structure(tokenizer) -> None:
    """The FSDP final save rebuilds a plain-class model's sites from the structure its config records."""
    import hc_retrofit
    from hc_retrofit.modeling.families import STRUCTURE_KEY
    from hc_retrofit.train.errors import TrainingError
    from hc_retrofit.train.export import unsharded_copy

    model = hc_retrofit.convert(tiny_lm(tokenizer), HCConfig(num_streams=2, variant="dynamic"))
    with torch.no_grad():
        for p in hc_retrofit.hyper_connection_sites(model)[1].parameters():  # away from init: a copy must carry it
            p.add_(0.1)
    recorded = getattr(model.config, STRUCTURE_KEY)
    copy = unsharded_copy(model, model.state_dict())
    assert type(copy) is type(model) and getattr(copy.config, STRUCTURE_KEY) == recorded
    ids = torch.randint(3, len(tokenizer), (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(copy.eval()(ids).logits, model.eval()(ids).logits, atol=0, rtol=0)
    delattr(model.config, STRUCTURE_KEY)
    with pytest.raises(TrainingError, match="records no hyper-connection structure"):
        unsharded_copy(model, model.state_dict())
