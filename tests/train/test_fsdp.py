"""FSDP2 for real: two CPU processes (gloo) under `accelerate launch` with an FSDP2 config.

accelerate accepts FSDP without a GPU (``use_cpu: true`` in recipes/accelerate/fsdp_cpu.yaml), so this
is the launcher and the code path a GPU run takes, on gloo. It trains a converted model a few steps
and checks: every parameter, base and HC, is a sharded DTensor; the loss of each step equals a
1-process run with the same global batch; the final save is gathered into one checkpoint that
`verify --trained` reads, holding the same weights as the 1-process run's; and a run resumed
(``--resume``) from the sharded ``save_state`` mid-run ends where the uninterrupted run ends (the
same losses and final weights).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
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

from .conftest import tiny_config, tiny_lm

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="the accelerate launcher is not on PATH")
def test_fsdp2_two_cpu_processes_match_one_process(tokenizer, corpus, cache_dir, tmp_path):
    plain, converted = tmp_path / "plain", tmp_path / "converted"
    tiny_lm(tokenizer).save_pretrained(plain)
    tokenizer.save_pretrained(plain)
    stream_convert(str(plain), converted, HCConfig(num_streams=4, variant="mhc"))  # records its base for verify
    out, record = tmp_path / "fsdp", tmp_path / "prepared"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE), os.environ.get("PYTHONPATH", "")]),
        "HC_PREPARED_RECORD": str(record),
    }

    def launch(run_dir: Path, *extra: str) -> None:
        cmd = [
            "accelerate", "launch", "--config_file", str(ROOT / "recipes" / "accelerate" / "fsdp_cpu.yaml"),
            "--main_process_port", str(_free_port()), str(HERE / "fsdp_run.py"),
            "train", str(converted), "--data", str(corpus), "--out", str(run_dir), "--block-size", "32",
            "--batch-size", "2", "--max-steps", "3", "--lr", "3e-3", "--warmup-steps", "1", "--eval-every", "2",
            "--eval-batches", "2", "--eval-fraction", "0.1", "--save-every", "2", "--cache-dir", cache_dir,
            "--no-progress", *extra,
        ]  # fmt: skip
        proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]

    launch(out)

    # one gloo group of two processes, every parameter sharded across them (HC sites with their layer)
    assert json.loads((out / "summary.json").read_text())["num_processes"] == 2
    records = [json.loads((tmp_path / f"prepared.{rank}.json").read_text()) for rank in (0, 1)]
    assert {r["distributed_type"] for r in records} == {"DistributedType.FSDP"}
    params = records[0]["params"]
    assert any(".hyper_connections." in n for n in params) and any(".hyper_connections." not in n for n in params)
    for name, info in params.items():
        assert info["dtensor"] and records[1]["params"][name]["dtensor"], name
        assert info["local"] + records[1]["params"][name]["local"] == info["full"], name
        if info["shape"][0] >= 2:
            assert 0 < info["local"] < info["full"], name
    (_, checkpoint), *_ = list_checkpoints(out)  # a sharded save_state mid-run
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
    verify = subprocess.run(
        [sys.executable, "-m", "hc_retrofit", "verify", str(out / "final"), "--trained", "--json"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert verify.returncode == 0, verify.stderr[-2000:]
    report = json.loads(verify.stdout)
    assert report["trained"] and report["max_abs_logit_diff"] > 0  # it learned, and was compared with its base
    assert not list((out / "final").glob("*.distcp")) and (out / "final" / "model.safetensors").is_file()
    got = load_converted(out / "final").state_dict()
    want = load_converted(single / "final").state_dict()
    assert got.keys() == want.keys()
    for key in got:
        torch.testing.assert_close(got[key], want[key], atol=1e-4, rtol=0, msg=key)

    # interrupted after the sharded checkpoint at step 2 (what a crash in step 2 leaves), then --resume:
    # the same loss curve and the same final weights as the uninterrupted run
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed, ignore=shutil.ignore_patterns("final", "summary.json", "loss.png"))
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
    got = load_converted(resumed / "final").state_dict()
    want = load_converted(out / "final").state_dict()
    assert got.keys() == want.keys()
    for key in got:
        torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=0, msg=key)


def test_the_gathered_copy_of_a_model_converted_on_the_fly_uses_its_recorded_structure(tokenizer) -> None:
    """The FSDP final save rebuilds a plain-class model's sites from the structure its config records."""
    import hc_retrofit
    from hc_retrofit.modeling.families import STRUCTURE_KEY
    from hc_retrofit.train.errors import TrainingError
    from hc_retrofit.train.loop import _unsharded_copy

    model = hc_retrofit.convert(tiny_lm(tokenizer), HCConfig(num_streams=2, variant="dynamic"))
    with torch.no_grad():
        for p in hc_retrofit.hyper_connection_sites(model)[1].parameters():  # away from init: a copy must carry it
            p.add_(0.1)
    recorded = getattr(model.config, STRUCTURE_KEY)
    copy = _unsharded_copy(model, model.state_dict())
    assert type(copy) is type(model) and getattr(copy.config, STRUCTURE_KEY) == recorded
    ids = torch.randint(3, len(tokenizer), (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(copy.eval()(ids).logits, model.eval()(ids).logits, atol=0, rtol=0)
    delattr(model.config, STRUCTURE_KEY)
    with pytest.raises(TrainingError, match="records no hyper-connection structure"):
        _unsharded_copy(model, model.state_dict())
