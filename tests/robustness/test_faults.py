"""One line for every fault: what happened and how to fix it, exit 1 (2 for flags), nothing half-written."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from hc_retrofit import outputs, ownership
from tests.checkpoints import HUB_OFFLINE_ENV

from .conftest import TRAIN, one_line_error, tree

HOLD_LOCK = """
import sys, time
from hc_retrofit import ownership
with ownership.output_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(60)
"""


@pytest.fixture
def lock_holder(tmp_path: Path):
    """Start a process that holds the lock of a path; yields (process, path)."""
    procs = []

    def start(path: Path) -> subprocess.Popen:
        env = {**os.environ, **HUB_OFFLINE_ENV, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
        proc = subprocess.Popen(
            [sys.executable, "-c", HOLD_LOCK, str(path)], stdout=subprocess.PIPE, text=True, env=env
        )
        assert proc.stdout.readline().strip() == "held"
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def test_two_writers_of_one_output_are_refused_with_the_holders_pid(
    cli, base_dir: Path, data_file: Path, tmp_path: Path, lock_holder
) -> None:
    out = tmp_path / "out"
    holder = lock_holder(out)
    result = cli("convert", base_dir, "--out", out)
    assert result.exit_code == 1 and f"pid {holder.pid}" in one_line_error(result)
    run = tmp_path / "run"
    holder = lock_holder(run)
    result = cli("train", base_dir, "--data", data_file, "--out", run, *TRAIN, "--resume")
    assert result.exit_code == 1 and f"pid {holder.pid}" in one_line_error(result)
    assert not out.exists() and not run.exists()


def test_a_dead_writers_lock_is_taken_over(cli, base_dir: Path, tmp_path: Path, lock_holder) -> None:
    out = tmp_path / "out"
    holder = lock_holder(out)
    holder.kill()
    holder.wait()
    assert (tmp_path / ".out.lock").exists()  # left by the killed process
    assert cli("convert", base_dir, "--out", out).exit_code == 0
    assert not (tmp_path / ".out.lock").exists()


def test_staging_names_are_unique_per_process_and_a_live_writers_staging_is_kept(tmp_path: Path) -> None:
    out = tmp_path / "out"
    other = tmp_path / f".out.{os.getppid()}-x.partial"  # a live process's
    other.mkdir()
    with ownership.output_lock(out):
        mine = outputs.staging_dir(out)
    assert f".out.{os.getpid()}-" in mine.name and other.is_dir()


@pytest.mark.parametrize("error", ["oserror", "safetensors"])
def test_a_full_disk_during_save_keeps_the_previous_output(
    cli, base_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: str
) -> None:
    import transformers.modeling_utils

    out = tmp_path / "out"
    assert cli("convert", base_dir, "--out", out, "--in-memory").exit_code == 0
    before = tree(out)

    def full(*args, **kwargs):
        path = Path(args[1] if len(args) > 1 else kwargs["filename"])
        path.write_bytes(b"half a shard")
        if error == "oserror":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        from safetensors import SafetensorError

        raise SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        )

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)  # the writer save_pretrained uses
    result = cli("convert", base_dir, "--out", out, "--in-memory", "--overwrite")
    assert result.exit_code == 1 and "No space left on device" in one_line_error(result)
    assert tree(out) == before  # the previous output, intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging left


@pytest.mark.parametrize("command", ["inspect", "train", "convert"])
def test_a_missing_shard_is_one_line(
    cli, converted_dir: Path, base_dir: Path, data_file: Path, tmp_path: Path, command
):
    from safetensors.torch import load_file, save_file

    source = converted_dir if command in ("inspect", "train") else base_dir
    sharded = Path(shutil.copytree(source, tmp_path / "sharded"))
    weights = sorted(sharded.glob("*.safetensors"))
    tensors = {}
    for file in weights:
        tensors.update(load_file(str(file)))
        file.unlink()
    names = sorted(tensors)
    half = len(names) // 2
    save_file({k: tensors[k] for k in names[:half]}, str(sharded / "model-00001-of-00002.safetensors"))
    index = {
        "metadata": {},
        "weight_map": {k: f"model-0000{1 + (i >= half)}-of-00002.safetensors" for i, k in enumerate(names)},
    }
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    args = {
        "inspect": ["inspect", sharded],
        "train": ["train", sharded, "--data", data_file, "--out", tmp_path / "run", *TRAIN],
        "convert": ["convert", sharded, "--out", tmp_path / "out"],
    }[command]
    result = cli(*args)
    assert result.exit_code == 1 and "model-00002-of-00002.safetensors" in one_line_error(result)
    assert "missing" in one_line_error(result)


@pytest.mark.parametrize("command", ["compare", "demo"])
@pytest.mark.parametrize("value", ["-1", "0"])
def test_bad_thread_counts_are_one_line(cli, base_dir: Path, data_file: Path, tmp_path: Path, command, value) -> None:
    args = {
        "compare": ["compare", base_dir, "--data", data_file, "--out", tmp_path / "cmp"],
        "demo": ["demo", "--quick", "--out", tmp_path / "demo"],
    }[command]
    result = cli(*args, "--threads", value)
    assert result.exit_code == 2 and "--threads" in one_line_error(result)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.txt"]


def test_inspect_plot_with_a_wrong_suffix_fails_before_any_work(cli, converted_dir: Path, tmp_path: Path) -> None:
    result = cli("inspect", converted_dir, "--plot", tmp_path / "x.json")
    assert result.exit_code == 1 and ".png" in one_line_error(result)
    assert not (tmp_path / "x.json").exists()


def test_a_symlink_loop_in_a_folder_to_push_is_one_line(cli, converted_dir: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(converted_dir, tmp_path / "ckpt"))
    (copy / "loop").symlink_to(copy / "loop")
    result = cli("push", copy, "me/x", "--dry-run")
    assert result.exit_code == 1 and "loop" in one_line_error(result)


class _NotTheHub(BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass

    def _html(self) -> None:
        body = b"<html><body>Welcome to the corporate proxy</body></html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_HEAD = _html


def test_a_hub_endpoint_answering_non_json_is_one_line(cli, converted_dir: Path, monkeypatch) -> None:
    import huggingface_hub.constants

    server = ThreadingHTTPServer(("127.0.0.1", 0), _NotTheHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_ENDPOINT", url)
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", url)
        monkeypatch.setenv("HF_TOKEN", "hf_x")
        result = cli("push", converted_dir, "me/x")
    finally:
        server.shutdown()
        server.server_close()
    assert result.exit_code == 1 and "HF_ENDPOINT" in one_line_error(result)
