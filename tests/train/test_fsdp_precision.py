"""FSDP2 with a bf16 ``MixedPrecisionPolicy``: the HC parameters still reach forward in float32.

Two processes (gloo on CPU; gloo runs FSDP's bf16 all-gathers and reduce-scatters) launched with
``python -m accelerate.commands.launch`` run ``fsdp_precision_worker.py`` for static, dynamic and mHC sites,
prepared as ``hc-retrofit train`` prepares a model. Checked: inside forward the decoder layers'
weights are bf16 while their sites' parameters are whole float32 tensors whose coefficients equal
an unsharded float32 copy's exactly (bf16-rounded parameters would change them); outside forward
every HC parameter is a float32 DTensor shard; the loss and every gradient are finite and match
the float32 copy's on the whole batch as closely as a one-process bf16 run does. The CUDA test runs
the same check with NCCL on the GPUs (``bash bench/gpu_check.sh``). In process: the trainer shards
the sites before building its optimiser; nothing changes without FSDP; RAM-efficient loading is
refused in one line.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("fsdp_precision_worker.py")
LAUNCH_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
num_machines: 1
num_processes: {processes}
mixed_precision: bf16
use_cpu: {cpu}
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_reshard_after_forward: true
  fsdp_state_dict_type: SHARDED_STATE_DICT
  fsdp_cpu_ram_efficient_loading: false
  fsdp_offload_params: false
  fsdp_activation_checkpointing: false
dynamo_config: {{}}
"""


def _launch(tmp_path: Path, processes: int, cpu: bool) -> dict:
    config = tmp_path / "fsdp_bf16.yaml"
    config.write_text(LAUNCH_CONFIG.format(processes=processes, cpu=str(cpu).lower()))
    out = tmp_path / "measured.json"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
        "--main_process_port", str(free_port()), str(WORKER), str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def _norm(values) -> float:
    return math.sqrt(sum(v * v for v in values))


def _check(measured: dict, processes: int) -> None:
    assert set(measured) == {"static", "dynamic", "mhc"}
    for variant, m in measured.items():
        where = f"{variant}: "
        assert (m["strategy"], m["mixed_precision"]) == ("fsdp2", "bf16"), where
        assert m["sharded_sites"] == m["sites"] == 4, where

        # between steps: every HC parameter is a float32 shard
        assert m["hc_dtensor_outside_forward"] and m["hc_dtypes_outside_forward"] == ["torch.float32"], where
        if processes == 2:
            assert 0.4 < m["hc_local_fraction"] < 0.6, where

        # inside forward (every layer, every site): the layer computes in bf16, its sites in float32
        assert len(m["inside_forward"]) == m["sites"], where
        for seen in m["inside_forward"]:
            assert seen["layer_weight_dtype"] == "torch.bfloat16", where
            assert seen["site_dtypes"] == ["torch.float32"] and not seen["site_dtensor"], where
            assert seen["coefficient_error"] == 0.0, where  # the float32 coefficients, bit for bit
        assert m["rounding_changes_coefficients_by"] > 1e-5, where  # so bf16 parameters would have failed

        # the step itself: finite, and as close to float32 as one bf16 process gets
        assert m["grads_finite"] and math.isfinite(m["loss"]), where
        assert m["loss"] == pytest.approx(m["reference_loss"], rel=2e-3), where
        for part in ("hyper_connections", "base"):
            grads = [g for name, g in m["grads"].items() if ("hyper_connections" in name) == (part != "base")]
            scale = _norm(g["norm"] for g in grads)
            fsdp = _norm(g["fsdp_error"] for g in grads) / scale
            single = _norm(g["single_bf16_error"] for g in grads) / scale
            assert fsdp < 3e-2 and fsdp < 2 * single, (where, part, fsdp, single)
            for name, g in m["grads"].items():
                if part != "base" and "hyper_connections" in name:
                    assert g["fsdp_error"] <= 0.05 * g["norm"] + 0.01 * scale, (name, g)


@pytest.mark.slow
def test_bf16_fsdp2_keeps_hc_parameters_float32_on_two_cpu_processes(tmp_path) -> None:
    _check(_launch(tmp_path, processes=2, cpu=True), processes=2)


@pytest.mark.cuda
def test_bf16_fsdp2_keeps_hc_parameters_float32_on_gpus(tmp_path) -> None:
    if not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    processes = min(2, torch.cuda.device_count())
    _check(_launch(tmp_path, processes=processes, cpu=False), processes=processes)


def test_without_fsdp_the_hc_sites_are_left_alone(tokenizer, tmp_path) -> None:
    """One process (or DDP): nothing is sharded, no hook is added, the parameters stay plain tensors."""
    import hc_retrofit
    from hc_retrofit.modeling.config import HCConfig
    from hc_retrofit.train.fsdp_precision import shard_hyper_connections
    from hc_retrofit.train.recipe import TrainConfig
    from hc_retrofit.train.strategy import make_accelerator

    from .conftest import tiny_lm

    model = hc_retrofit.convert(tiny_lm(tokenizer), HCConfig(num_streams=2, variant="mhc"))
    accelerator = make_accelerator(TrainConfig(out=str(tmp_path), cpu=True), tmp_path)
    assert shard_hyper_connections(accelerator, model) == 0
    assert not model._forward_pre_hooks
    assert all(type(p) is torch.nn.Parameter for p in model.parameters())


def test_ram_efficient_loading_is_refused_in_one_line(tokenizer) -> None:
    """accelerate would fill the sharded HC unit from the main process's state dict: refused, not broken."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    import hc_retrofit
    from hc_retrofit.modeling.config import HCConfig
    from hc_retrofit.train.errors import TrainingError
    from hc_retrofit.train.fsdp_precision import shard_hyper_connections

    from .conftest import tiny_lm

    model = hc_retrofit.convert(tiny_lm(tokenizer), HCConfig(num_streams=2, variant="mhc"))
    plugin = SimpleNamespace(fsdp_version=2, cpu_ram_efficient_loading=True)
    accelerator = SimpleNamespace(distributed_type=DistributedType.FSDP, state=SimpleNamespace(fsdp_plugin=plugin))
    with pytest.raises(TrainingError, match="fsdp_cpu_ram_efficient_loading: false"):
        shard_hyper_connections(accelerator, model)
    assert all(type(p) is torch.nn.Parameter for p in model.parameters())  # nothing sharded


def test_the_trainer_shards_the_hc_sites_before_building_the_optimiser(
    tokenizer, corpus, cache_dir, tmp_path, monkeypatch
) -> None:
    """``hc-retrofit train`` goes through :func:`shard_hyper_connections` (a no-op without FSDP2)."""
    import hc_retrofit.train.trainer as trainer
    from hc_retrofit.train import train

    from .conftest import tiny_config, tiny_lm

    calls: list[tuple] = []
    real_build = trainer.build_optimizer
    monkeypatch.setattr(trainer, "shard_hyper_connections", lambda acc, model: calls.append(("shard", model)) or 0)
    monkeypatch.setattr(
        trainer, "build_optimizer", lambda model, **kw: calls.append(("optimiser", model)) or real_build(model, **kw)
    )
    model = tiny_lm(tokenizer)
    train(tiny_config(tmp_path / "run", corpus, cache_dir, max_steps=1, streams=2), model=model, tokenizer=tokenizer)
    assert [step for step, _ in calls] == ["shard", "optimiser"] and all(m is model for _, m in calls)
