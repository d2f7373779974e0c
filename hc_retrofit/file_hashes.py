"""SHA-256 of the files hc-retrofit writes: what an output's ownership manifest records.

:func:`hash_record` hashes a file right after it was written (in the thread that wrote it, while it
is in the page cache) and keeps the identity of the file it hashed, so that
:func:`~hc_retrofit.ownership.seal` can reuse the hash instead of reading the file once more.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from typing import Any

HASH_BLOCK = 256 * 2**10
"""Bytes read per step by :func:`hash_record`: small enough to stay in the CPU's cache between the
read and the hash (8 MiB blocks hash a third slower)."""


def sha256_file(path: str | os.PathLike) -> str:
    """The SHA-256 of a file, read in large blocks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def sha256_prefix(path: str | os.PathLike, size: int) -> str:
    """The SHA-256 of the first ``size`` bytes of a file (of all of it, if shorter)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        left = size
        while left > 0:
            block = f.read(min(left, 1 << 20))
            if not block:
                break
            digest.update(block)
            left -= len(block)
    return digest.hexdigest()


def hash_record(path: str | os.PathLike, stop: Callable[[], bool] | None = None) -> dict[str, Any] | None:
    """``{size, mtime_ns, ino, ctime_ns, sha256}`` of a file this process just wrote, for the manifest
    to reuse; ``None`` when the file changed while it was being hashed, or ``stop()`` became true
    (checked between blocks, so that a cancelled writer does not wait for a large file's hash)."""
    before = os.stat(path)
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buffer = memoryview(bytearray(HASH_BLOCK))
        while got := f.readinto(buffer):
            if stop is not None and stop():
                return None
            digest.update(buffer[:got])  # releases the GIL: other threads run meanwhile
    after = os.stat(path)
    if _identity(before) != _identity(after):
        return None
    size, mtime_ns, ino, ctime_ns = _identity(after)
    return {"size": size, "mtime_ns": mtime_ns, "ino": ino, "ctime_ns": ctime_ns, "sha256": digest.hexdigest()}


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    """What changes when a file is written, replaced or has its times set (``utime`` cannot set ctime)."""
    return st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns


def same_file(record: dict[str, Any] | None, st: os.stat_result) -> bool:
    """Whether ``record`` (a manifest entry, or a :func:`hash_record`) describes the file whose stat is
    ``st``: same size and modification time, and, when the record has them (a :func:`hash_record`),
    the same inode and change time (a file rewritten or replaced since it was hashed is hashed again)."""
    if not record or record.get("size") != st.st_size or record.get("mtime_ns") != st.st_mtime_ns:
        return False
    return record.get("ino", st.st_ino) == st.st_ino and record.get("ctime_ns", st.st_ctime_ns) == st.st_ctime_ns
