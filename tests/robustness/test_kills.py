"""kill -9 at the worst moments: the previous output survives, and what is left stays provably ours."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.checkpoints import HUB_OFFLINE_ENV

from .conftest import TRAIN, tree

KILL_AT = """
import os, signal, sys
from hc_retrofit import outputs
from hc_retrofit.train import checkpoint
where = sys.argv[1]
die = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
if where == "replace":  # the new output is complete, the old one not yet swapped out
    outputs.replace_dir = die
else:
    real = checkpoint.save_checkpoint
    def save(accelerator, out_dir, step, state, **kwargs):
        accelerator.save_state = die  # killed while accelerate writes the staging checkpoint
        return real(accelerator, out_dir, step, state, **kwargs)
    checkpoint.save_checkpoint = save
from hc_retrofit.cli.app import main
main(sys.argv[2:])
"""


def _killed(where: str, *args: object, cwd: Path) -> None:
    env = {**os.environ, **HUB_OFFLINE_ENV, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run(
        [sys.executable, "-c", KILL_AT, where, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True
    )
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]


def test_kill_during_convert_overwrite_keeps_the_previous_output(cli, base_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert cli("convert", base_dir, "--out", out).exit_code == 0
    before = tree(out)
    _killed("replace", "convert", base_dir, "--out", out, "--overwrite", cwd=tmp_path)
    assert tree(out) == before
    assert cli("convert", base_dir, "--out", out, "--overwrite").exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # staging and lock of the killed runs: gone


def test_a_run_killed_while_saving_a_checkpoint_stays_ours(cli, base_dir: Path, data_file: Path, tmp_path: Path):
    run = tmp_path / "run"
    train = ["train", base_dir, "--data", data_file, "--out", run, *TRAIN, "--max-steps", "4", "--save-every", "2"]
    _killed("checkpoint", *train, cwd=tmp_path)
    assert any(p.name.startswith(".tmp-step") for p in (run / "checkpoints").iterdir())
    assert cli(*train, "--overwrite").exit_code == 0  # the half-written checkpoint is the run's own
    assert (run / "final").is_dir() and not (run / "checkpoints" / ".tmp-step-00000002").exists()
