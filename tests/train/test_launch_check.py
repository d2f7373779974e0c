"""The warning when a launcher asked for N > 1 processes but the run has world size 1."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hc_retrofit.train.launch_check import requested_processes, single_process_warning

SIMPLE = {"ACCELERATE_DYNAMO_BACKEND": "NO", "ACCELERATE_MIXED_PRECISION": "no"}  # what the simple launcher exports


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"ACCELERATE_NUM_PROCESSES": "8"}, 8),
        ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}, 2),  # torchrun, accelerate --multi_gpu
        ({"ACCELERATE_NUM_PROCESSES": "3", "WORLD_SIZE": "2"}, 3),
        (SIMPLE, None),
        ({"WORLD_SIZE": "two"}, None),
        ({}, None),
    ],
)
def test_requested_processes_from_the_environment(environ, expected) -> None:
    assert requested_processes(environ) == expected


def test_warns_only_when_fewer_processes_run_than_were_asked_for() -> None:
    message = single_process_warning(1, {"ACCELERATE_NUM_PROCESSES": "2"})
    assert message is not None and "asked for 2 processes" in message and "--multi_gpu" in message
    assert single_process_warning(2, {"ACCELERATE_NUM_PROCESSES": "2"}) is None
    assert single_process_warning(2, {"WORLD_SIZE": "2"}) is None
    assert single_process_warning(1, {"WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}) is None
    assert single_process_warning(1, SIMPLE) is None  # the simple launcher with one process
    several = single_process_warning(1, {**SIMPLE, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"})
    assert several is not None and "asked for several processes" in several
    assert single_process_warning(1, {"MASTER_ADDR": "127.0.0.1"}) is None  # not launched by accelerate


@pytest.mark.parametrize(("processes", "warned"), [(2, True), (1, False)])
def test_accelerates_simple_launcher_tells_its_process_what_it_was_asked_for(
    tmp_path: Path, processes: int, warned: bool
) -> None:
    """The real ``accelerate launch --num_processes N`` (no ``--multi_gpu``): one process, whose
    environment says whether more were asked for."""
    script = tmp_path / "child.py"
    script.write_text(
        "from hc_retrofit.train.launch_check import single_process_warning\n"
        "print('WARNING' if single_process_warning(1) else 'QUIET')\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "WORLD_SIZE", "ACCELERATE_NUM_PROCESSES")}
    env["HF_HOME"] = str(tmp_path / "hf")  # no accelerate default config of this machine
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes)]
    proc = subprocess.run(
        [*command, "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["WARNING" if warned else "QUIET"], proc.stdout + proc.stderr[-2000:]


def test_train_logs_the_warning(tokenizer, corpus, cache_dir, tmp_path, monkeypatch, caplog) -> None:
    from hc_retrofit.train.loop import train

    from .conftest import tiny_config, tiny_lm

    monkeypatch.setenv("ACCELERATE_NUM_PROCESSES", "2")
    with caplog.at_level(logging.WARNING, logger="hc_retrofit"):
        train(
            tiny_config(tmp_path / "run", corpus, cache_dir, max_steps=1), model=tiny_lm(tokenizer), tokenizer=tokenizer
        )
    assert any("asked for 2 processes" in r.getMessage() for r in caplog.records)
