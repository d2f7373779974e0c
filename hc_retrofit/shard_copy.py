"""Copy a checkpoint's safetensors shards in the background, while the rest of convert starts up.

A streamed convert is a copy of the base shards plus a few small files. The copy is the kernel's
work (``copy_file_range``, as ``cp`` does), the rest is mostly Python importing torch and
transformers and building a weightless model. Done one after the other, the start-up is added to
the copy; here the copy starts first, in a thread (the system call releases the GIL), so a
convert takes about the longer of the two. This module imports neither torch nor transformers,
so the copy can start before they are imported.

The copy goes into the staging directory the convert writes its output to; if the convert then
fails (or cannot stream), :meth:`ShardCopier.cancel` stops it between chunks, and the caller
removes the directory, as for any failed convert. Each shard is hashed (SHA-256, for the output's
ownership manifest) by the same thread right after it is written, while it is in the page cache,
so the manifest does not read it back at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

from hc_retrofit import outputs
from hc_retrofit.checkpoint_format import HC_SHARD, INDEX_FILE, SINGLE_FILE
from hc_retrofit.file_hashes import hash_record

SINGLE_RENAMED = "model-00001-of-00001.safetensors"  # model.safetensors would hide the index from transformers
CHUNK = 256 * 2**20  # bytes per copy_file_range call: how soon a cancel takes effect
FICLONE = 0x40049409  # Linux ioctl: share the source's blocks (btrfs, xfs; copy on write), as cp tries first


class NoShards(Exception):
    """Why the shards cannot be listed (the caller then does not stream)."""


def base_shards(local: Path) -> list[tuple[Path, str]]:
    """``(file, output name)`` of every weight shard of checkpoint directory ``local``, from its
    single ``model.safetensors`` or its index (which must name existing files beside it)."""
    index = local / INDEX_FILE
    if (local / SINGLE_FILE).is_file():
        return [(local / SINGLE_FILE, SINGLE_RENAMED)]
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as err:
            raise NoShards(f"{INDEX_FILE} is unreadable") from err
        if any(not isinstance(n, str) or Path(n).name != n or n == HC_SHARD for n in names):
            raise NoShards(f"{INDEX_FILE} names shards in sub-directories or a shard called {HC_SHARD}")
        missing = [n for n in names if not (local / n).is_file()]
        if missing:
            raise NoShards(f"shard {missing[0]} is missing")
        return [(local / n, n) for n in names]
    raise NoShards("it has no safetensors weights")


class Cancelled(Exception):
    """The copy was cancelled."""


def _clone(fin: int, fout: int) -> bool:
    """Whether the filesystem made ``fout`` share ``fin``'s blocks (a reflink: instant, no space used)."""
    try:
        import fcntl

        fcntl.ioctl(fout, FICLONE, fin)
        return True
    except (ImportError, OSError):
        return False


def _copy(src: Path, dst: Path, stop: threading.Event, mode: int) -> None:
    """``src`` to ``dst`` as ``cp`` does it: a reflink where the filesystem can, else in the kernel
    (``copy_file_range``, else ``sendfile``) in chunks, with the source read sequentially. ``dst``
    gets ``mode`` (what the output's other files get), so that nothing changes it after it is hashed."""
    size = src.stat().st_size
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        if _clone(fin.fileno(), fout.fileno()):
            os.chmod(dst, mode)
            return
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fin.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        done = 0
        kernel = hasattr(os, "copy_file_range")
        while done < size:
            if stop.is_set():
                raise Cancelled
            n = min(CHUNK, size - done)
            try:
                got = os.copy_file_range(fin.fileno(), fout.fileno(), n) if kernel else 0
            except OSError:  # e.g. across filesystems on old kernels: a plain copy
                kernel, got = False, 0
            if not kernel:
                got = os.sendfile(fout.fileno(), fin.fileno(), done, n)  # writes at (and advances) fout's position
            if got == 0:
                raise OSError(f"{src} shrank while being copied")
            done += got
    os.chmod(dst, mode)


class ShardCopier:
    """Copies (or with ``link``, hard links where possible) shards into a directory, in a thread.

    ``files``: ``(source, name in dest)``. :meth:`wait` returns the names hard linked and re-raises
    the copy's error, if any; ``seconds`` is how long the copy took (hashing included); ``hashed``
    holds the :func:`~hc_retrofit.file_hashes.hash_record` of each file written, by name.
    """

    def __init__(self, files: list[tuple[Path, str]], dest: Path, *, link: bool = False) -> None:
        self.files, self.dest, self.link = files, dest, link
        self.linked: list[str] = []
        self.hashed: dict[str, dict] = {}
        self.mode = 0o666 & ~outputs.umask()  # read here: changing the umask in a thread would race
        self.notes: list[str] = []  # e.g. why a shard could not be linked
        self.seconds = 0.0
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="hc-retrofit-shard-copy", daemon=True)

    def start(self) -> ShardCopier:
        self._thread.start()
        return self

    def _run(self) -> None:
        start = time.perf_counter()
        try:
            for src, name in self.files:
                real, dst = src.resolve(), self.dest / name  # Hub caches hold symlinks to blobs
                if not (self.link and self._link(src, dst, name)):
                    _copy(real, dst, self._stop, self.mode)
                record = hash_record(dst, stop=self._stop.is_set)
                if self._stop.is_set():
                    raise Cancelled
                if record is not None:
                    self.hashed[name] = record
        except BaseException as err:  # handed to the waiting thread
            self._error = err
        finally:
            self.seconds = time.perf_counter() - start

    def _link(self, src: Path, dst: Path, name: str) -> bool:
        """Hard link ``src`` (resolved: Hub caches hold symlinks to blobs) as ``dst``; whether it worked
        (else a note says why)."""
        try:
            os.link(src.resolve(), dst)
        except OSError as err:
            self.notes.append(f"cannot hard link {src.name} ({err.strerror or err}): copying it")
            return False
        self.linked.append(name)
        return True

    def wait(self) -> list[str]:
        """Block until the copy is done; the names that were hard linked. Re-raises a copy error."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self.linked

    def cancel(self) -> None:
        """Stop the copy (between chunks) and wait for the thread; its files are the caller's to remove."""
        self._stop.set()
        self._thread.join()


class EarlyCopy:
    """A staging directory for the output of a convert, with the base shards being copied into it."""

    def __init__(self, out: Path, staging: Path, copier: ShardCopier) -> None:
        self.out, self.staging, self.copier = out, staging, copier

    def abort(self) -> None:
        """Stop the copy and remove the staging directory (the convert failed or does not stream)."""
        self.copier.cancel()
        shutil.rmtree(self.staging, ignore_errors=True)


def start_copy(source: str, out_dir: str | os.PathLike, *, overwrite: bool, link: bool) -> EarlyCopy | None:
    """Check ``out_dir`` (as every convert does) and start copying local checkpoint ``source``'s
    shards into a fresh staging directory for it; ``None`` when ``source`` is not a local
    safetensors checkpoint (a Hub id is downloaded first; the caller then copies later).

    Raises :class:`~hc_retrofit.modeling.errors.OutputExistsError` for an ``out_dir`` that may not be written.
    """
    out = outputs.check_output_dir(Path(out_dir), overwrite=overwrite, inputs=[source])
    local = Path(source).expanduser()
    if not local.is_dir():
        return None
    try:
        files = base_shards(local)
    except NoShards:
        return None
    staging = outputs.staging_dir(out)
    return EarlyCopy(out, staging, ShardCopier(files, staging, link=link).start())
