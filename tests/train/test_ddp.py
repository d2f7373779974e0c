"""Two CPU processes under `accelerate launch` (DDP over gloo): one group, main-only writes, same maths.

On a GPU-less machine `accelerate launch --multi_gpu` forms a gloo group only with cpu=True,
otherwise each process runs alone as "main" and they race; hc-retrofit asks for it whenever
WORLD_SIZE > 1 and there is no GPU. The launch command is the one the single-process warning
suggests, run with this interpreter's launcher (``python -m accelerate.commands.launch``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hc_retrofit.train import train
from hc_retrofit.train.checkpoint import list_checkpoints
from hc_retrofit.train.metrics import read_metrics

from .conftest import free_port, tiny_config, tiny_lm

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_two_process_cpu_ddp_matches_one_process_with_the_global_batch(tokenizer, corpus, cache_dir, tmp_path):
    model_dir = tmp_path / "plain-model"
    tiny_lm(tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "ddp"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), "-m", "hc_retrofit",
        "train", str(model_dir), "--data", str(corpus), "--out", str(out), "--block-size", "32",
        "--batch-size", "2", "--max-steps", "3", "--lr", "3e-3", "--warmup-steps", "1", "--eval-every", "2",
        "--eval-batches", "2", "--eval-fraction", "0.1", "--save-every", "2", "--cache-dir", cache_dir, "--no-progress",
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]

    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_processes"] == 2  # one gloo group of two, not two lone "main" processes
    assert summary["strategy"] == "ddp" and summary["local_parameter_fraction"] == 1.0
    (_, ckpt), *_ = list_checkpoints(out)
    assert sorted(p.name for p in ckpt.glob("random_states_*.pkl")) == ["random_states_0.pkl", "random_states_1.pkl"]
    rows = read_metrics(out)
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == [0, 1, 2]  # written once: only the main process writes
    assert proc.stdout.count("model: ") == 1
    assert "Removed shared tensor" not in proc.stdout + proc.stderr  # the tied lm_head is known: no notice per save

    # DDP averages gradients, so 2 processes x batch 2 == 1 process x batch 4 (same samples per step;
    # eval: 2 batches x 2 x 2 processes == 2 batches x 4 on one)
    single = tmp_path / "single"
    train(
        tiny_config(single, corpus, cache_dir, batch_size=4, max_steps=3, eval_every=2, eval_batches=2),
        model=tiny_lm(tokenizer),
        tokenizer=tokenizer,
    )
    for a, b in zip([r for r in rows if "loss" in r], [r for r in read_metrics(single) if "loss" in r], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=2e-5)
    evals_ddp = [r["eval_loss"] for r in rows if "eval_loss" in r]
    evals_one = [r["eval_loss"] for r in read_metrics(single) if "eval_loss" in r]
    assert evals_ddp == pytest.approx(evals_one, abs=2e-5)
