"""The warning when a launcher asked for N > 1 processes but the run has world size 1."""

from __future__ import annotations

import logging

import pytest

from hc_retrofit.train.launch_check import requested_processes, single_process_warning

PY = "/usr/bin/python3"


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([PY, "/x/bin/accelerate", "launch", "--num_processes", "2", "-m", "hc_retrofit", "train"], 2),
        ([PY, "/x/bin/accelerate", "launch", "--num-processes=3", "-m", "hc_retrofit"], 3),
        ([PY, "/x/bin/accelerate-launch", "--num_processes", "4", "train.py"], 4),
        ([PY, "-m", "accelerate.commands.launch", "--num_processes", "2", "-m", "hc_retrofit"], 2),
        ([PY, "/x/bin/accelerate", "launch", "-m", "hc_retrofit", "train"], None),
        ([PY, "-m", "pytest", "--num_processes", "2"], None),  # not accelerate launch
        (None, None),
    ],
)
def test_requested_processes_from_the_launch_command(argv, expected) -> None:
    assert requested_processes({}, argv) == expected


def test_requested_processes_from_a_launch_config_and_the_environment(tmp_path) -> None:
    config = tmp_path / "multi_cpu.yaml"
    config.write_text("distributed_type: MULTI_CPU\nnum_processes: 2\n")
    argv = [PY, "/x/bin/accelerate", "launch", "--config_file", str(config), "-m", "hc_retrofit"]
    assert requested_processes({}, argv) == 2
    assert requested_processes({"ACCELERATE_NUM_PROCESSES": "8"}, None) == 8


def test_warns_only_when_fewer_processes_run_than_were_asked_for() -> None:
    argv = [PY, "/x/bin/accelerate", "launch", "--num_processes", "2", "-m", "hc_retrofit", "train"]
    message = single_process_warning(1, {}, argv)
    assert message is not None and "asked for 2 processes" in message and "--multi_gpu" in message
    assert single_process_warning(2, {}, argv) is None
    assert single_process_warning(1, {}, [PY, "-m", "hc_retrofit", "train"]) is None


def test_train_logs_the_warning(tokenizer, corpus, cache_dir, tmp_path, monkeypatch, caplog) -> None:
    from hc_retrofit.train.loop import train

    from .conftest import tiny_config, tiny_lm

    monkeypatch.setenv("ACCELERATE_NUM_PROCESSES", "2")
    with caplog.at_level(logging.WARNING, logger="hc_retrofit"):
        train(
            tiny_config(tmp_path / "run", corpus, cache_dir, max_steps=1), model=tiny_lm(tokenizer), tokenizer=tokenizer
        )
    assert any("asked for 2 processes" in r.getMessage() for r in caplog.records)
