"""The default CPU threads of a training process: its cores (affinity, cgroup quota), the free ones, per process."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hc_retrofit.train import threads


def _cgroup(root: Path, files: dict[str, str]) -> str:
    for name, text in files.items():
        path = root / name.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return str(root)


@pytest.mark.parametrize(
    ("files", "quota"),
    [
        ({threads.CPU_MAX: "150000 100000\n"}, 1.5),
        ({threads.CPU_MAX: "max 100000\n"}, None),
        ({threads.CFS_QUOTA: "200000\n", threads.CFS_PERIOD: "100000\n"}, 2.0),
        ({threads.CFS_QUOTA: "-1\n", threads.CFS_PERIOD: "100000\n"}, None),
        ({}, None),
    ],
)
def test_the_cgroup_quota_caps_the_cores(tmp_path, files, quota) -> None:
    root = _cgroup(tmp_path, files)
    assert threads._cgroup_cpus(root) == quota
    affinity = len(os.sched_getaffinity(0))
    want = affinity if quota is None else min(affinity, max(1, int(quota)))
    assert threads.available_cores(root) == want


def test_threads_x_local_processes_never_exceed_the_free_cores(tmp_path, monkeypatch) -> None:
    root = _cgroup(tmp_path, {threads.CPU_MAX: "800000 100000\n"})  # quota of 8 cores
    monkeypatch.setattr(threads, "available_cores", lambda root="": 8)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert threads.default_threads(root, idle=None) == 8
    assert threads.default_threads(root, idle=7.6) == 8
    assert threads.default_threads(root, idle=2.4) == 2  # the other six cores are busy: not ours
    assert threads.default_threads(root, idle=0.0) == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert threads.default_threads(root, idle=None) == 4
    assert threads.default_threads(root, idle=0.3) == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert threads.default_threads(root, idle=None) == 1


def test_idle_cores_reads_proc_stat(tmp_path, monkeypatch) -> None:
    stat = tmp_path / "stat"
    samples = iter(["cpu 100 0 100 800 0 0 0 0 0 0\n", "cpu 150 0 150 900 0 0 0 0 0 0\n"])

    def sleep(_: float) -> None:
        stat.write_text(next(samples))

    stat.write_text(next(samples))
    monkeypatch.setattr("time.sleep", sleep)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    assert threads.idle_cores(0.1, str(stat)) == pytest.approx(4 * 100 / 200)  # half the time idle
    assert threads.idle_cores(0.1, str(tmp_path / "missing")) is None


def test_apply_threads_sets_torch_and_none_leaves_it() -> None:
    import torch

    before = torch.get_num_threads()
    try:
        assert threads.apply_threads(1) == 1 == torch.get_num_threads()
        assert threads.apply_threads(None) == 1
    finally:
        torch.set_num_threads(before)
