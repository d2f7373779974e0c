"""Hashes of written files: computed once, by their writer, and reused by the manifest only while
the file is still the one that was hashed."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from hc_retrofit import file_hashes, ownership
from hc_retrofit.shard_copy import ShardCopier


def _file(path: Path, size: int = 3 * file_hashes.HASH_BLOCK + 17) -> Path:
    path.write_bytes(os.urandom(size))
    return path


def test_hash_record_is_the_file_sha256_with_its_identity(tmp_path: Path) -> None:
    path = _file(tmp_path / "a.bin")
    record = file_hashes.hash_record(path)
    st = path.stat()
    assert record == {
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "ino": st.st_ino,
        "ctime_ns": st.st_ctime_ns,
        "sha256": ownership.sha256_file(path),
    }
    assert file_hashes.same_file(record, st)


def test_a_stopped_hash_returns_nothing(tmp_path: Path) -> None:
    assert file_hashes.hash_record(_file(tmp_path / "a.bin"), stop=lambda: True) is None


def test_a_file_replaced_with_the_same_size_and_time_is_not_the_same_file(tmp_path: Path) -> None:
    path = _file(tmp_path / "a.bin", 1000)
    record = file_hashes.hash_record(path)
    st = path.stat()
    time.sleep(0.05)  # past the filesystem's timestamp tick
    path.unlink()
    _file(path, 1000)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and mtime (the inode may be reused)
    assert not file_hashes.same_file(record, path.stat())


def test_seal_reuses_a_writer_hash_and_hashes_the_rest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    big, small = _file(tmp_path / "big.bin"), _file(tmp_path / "small.json", 10)
    hashed = {"big.bin": file_hashes.hash_record(big)}
    read: list[str] = []
    real = ownership.sha256_file
    monkeypatch.setattr(ownership, "sha256_file", lambda p: read.append(Path(p).name) or real(p))
    ownership.seal(tmp_path, "test", hashed)
    assert read == ["small.json"]  # the big file is not read back
    files = json.loads((tmp_path / ownership.MANIFEST).read_text())["files"]
    assert files["big.bin"]["sha256"] == real(big) and files["small.json"]["sha256"] == real(small)
    assert "ino" not in files["big.bin"]  # the manifest's format is unchanged


def test_seal_hashes_again_a_file_changed_after_its_writer_hashed_it(tmp_path: Path) -> None:
    path = _file(tmp_path / "a.bin", 1000)
    stale = file_hashes.hash_record(path)
    time.sleep(0.05)
    path.unlink()
    _file(path, 1000)
    os.utime(path, ns=(stale["mtime_ns"], stale["mtime_ns"]))
    ownership.seal(tmp_path, "test", {"a.bin": stale})
    entry = json.loads((tmp_path / ownership.MANIFEST).read_text())["files"]["a.bin"]
    assert entry["sha256"] == ownership.sha256_file(path) != stale["sha256"]
    assert not ownership.lost_files(tmp_path)


@pytest.mark.parametrize("link", [False, True])
def test_the_shard_copier_hashes_what_it_wrote(tmp_path: Path, link: bool) -> None:
    src = _file(tmp_path / "src.bin")
    (tmp_path / "out").mkdir()
    copier = ShardCopier([(src, "copy.bin")], tmp_path / "out", link=link).start()
    copier.wait()
    assert copier.hashed["copy.bin"] == file_hashes.hash_record(tmp_path / "out" / "copy.bin")
    assert copier.hashed["copy.bin"]["sha256"] == ownership.sha256_file(src)


def test_a_cancelled_copier_stops_while_hashing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hc_retrofit import shard_copy

    src = _file(tmp_path / "src.bin")
    (tmp_path / "out").mkdir()
    started, release = threading.Event(), threading.Event()
    real = shard_copy.hash_record

    def slow(path: Path, stop):  # the copy is done; cancel arrives while hashing
        started.set()
        release.wait(10)
        return real(path, stop=stop)

    monkeypatch.setattr(shard_copy, "hash_record", slow)
    copier = ShardCopier([(src, "copy.bin")], tmp_path / "out").start()
    assert started.wait(10)
    threading.Timer(0.05, release.set).start()
    copier.cancel()
    with pytest.raises(shard_copy.Cancelled):
        copier.wait()
    assert copier.hashed == {}


@pytest.mark.parametrize("dtype", ["auto", "float16"])
def test_a_streamed_convert_hashes_each_base_shard_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: str
) -> None:
    """Copied shards: hashed by the copying thread, not read back by the manifest; re-encoded ones
    (``--dtype``): hashed as the manifest is written. Either way the manifest holds their true hashes."""
    from hc_retrofit.modeling.config import HCConfig
    from hc_retrofit.streaming import stream_convert
    from tests.tiny import tiny_model

    base = tmp_path / "base"
    tiny_model("llama-gqa-untied").save_pretrained(base, max_shard_size="20KB")
    shards = sorted(p.name for p in base.glob("*.safetensors"))
    read: list[str] = []
    real = ownership.sha256_file
    monkeypatch.setattr(ownership, "sha256_file", lambda p: read.append(Path(p).name) or real(p))
    out = tmp_path / "out"
    stream_convert(str(base), out, HCConfig(), dtype=dtype)
    if dtype == "auto":
        assert not set(read) & set(shards)
    else:
        assert set(shards) <= set(read)
    files = json.loads((out / ownership.MANIFEST).read_text())["files"]
    assert set(shards) <= set(files)
    for name, entry in files.items():
        assert entry["sha256"] == real(out / name), name
    assert not ownership.lost_files(out)
