"""Which files hc-retrofit wrote, proved by a manifest, and the lock that keeps writers apart.

Every directory this tool writes (a converted checkpoint, a training run, a demo, a comparison)
carries :data:`MANIFEST`: a JSON list of exactly the files it wrote, each with its size,
modification time and SHA-256 (computed once, right after the file was written, while it is
still in the page cache; a streamed convert hashes each base shard in the thread that copies it,
while the main thread works: :func:`~hc_retrofit.file_hashes.hash_record`). A directory may be replaced or deleted
(``--overwrite``) only when :func:`lost_files` is empty: every file in it is in its manifest and
unchanged (same size; same modification time, or else the same SHA-256), and every sub-directory
is one the manifest names as ours (with a manifest of its own, also checked).

A manifest is only ever written into a directory the tool created (or found empty): see
:func:`adopt_dir`. Nothing here decides "ours" from file names.

:func:`output_lock` holds ``.NAME.lock`` beside an output directory while a process writes it
(an OS lock, released when the process dies); a second writer is refused with the holder's pid.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from hc_retrofit.file_hashes import same_file, sha256_file, sha256_prefix
from hc_retrofit.modeling.errors import OutputExistsError

MANIFEST = ".hc-retrofit-output"
"""The manifest file (JSON) of a directory written by hc-retrofit."""
FORMAT = 2
"""Manifest format; a marker without ``files`` (older versions) proves nothing."""
_MANIFEST_TMP = MANIFEST + ".tmp"
SHOWN = 4
"""How many files an error lists before ``and N more``."""


# ----------------------------------------------------------------------------- hashing
def _record(path: Path, previous: dict[str, Any] | None = None, *, append: bool = False) -> dict[str, Any]:
    """``{size, mtime_ns, sha256}`` of ``path``; the previous hash is reused when it describes this file
    (:func:`~hc_retrofit.file_hashes.same_file`)."""
    st = path.stat()
    digest = previous["sha256"] if previous and same_file(previous, st) else sha256_file(path)
    entry: dict[str, Any] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    if append:
        entry["append"] = True
    return entry


def _unchanged(path: Path, entry: dict[str, Any]) -> bool:
    """Whether ``path`` is still the file ``entry`` describes (an ``append`` log may only have grown)."""
    try:
        st = path.stat()
    except OSError:
        return False
    if entry.get("append"):
        return st.st_size >= entry["size"] and sha256_prefix(path, entry["size"]) == entry["sha256"]
    if st.st_size != entry.get("size"):
        return False
    if st.st_mtime_ns == entry.get("mtime_ns"):
        return True
    return sha256_file(path) == entry.get("sha256")


# ----------------------------------------------------------------------------- reading and writing
def read_manifest(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The manifest of ``directory``, or ``None`` when it has none (or an unreadable or old one)."""
    path = Path(directory) / MANIFEST
    if path.is_symlink() or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("files"), dict):
        return None
    data.setdefault("dirs", [])
    data.setdefault("claims", [])
    return data


def _write(directory: Path, data: dict[str, Any]) -> None:
    tmp = directory / _MANIFEST_TMP
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, directory / MANIFEST)


def _new(kind: str) -> dict[str, Any]:
    from hc_retrofit.version import __version__

    return {
        "format": FORMAT,
        "kind": kind,
        "version": __version__,
        "files": {},
        "dirs": [],
        "claims": [],
    }


def _walk_files(directory: Path) -> Iterator[Path]:
    for folder, dirs, names in os.walk(directory, followlinks=False):
        dirs.sort()
        for name in sorted(names):
            yield Path(folder) / name


def seal(directory: str | os.PathLike, kind: str, hashed: dict[str, dict[str, Any]] | None = None) -> None:
    """Record every file now in ``directory`` (which this process created and wrote) as ours.

    For a staging directory that is complete: nothing but this tool has written into it.
    ``hashed``: :func:`~hc_retrofit.file_hashes.hash_record` of files (relative paths) already hashed by their writer, reused
    when the file is still the one hashed (same inode, size and modification time), so a large file
    is not read back once more.
    """
    root = Path(directory)
    data = read_manifest(root) or _new(kind)
    old = data["files"]
    hashed = hashed or {}
    files = {}
    for path in _walk_files(root):
        rel = path.relative_to(root).as_posix()
        if rel in (MANIFEST, _MANIFEST_TMP):
            continue
        previous = hashed.get(rel) or old.get(rel)
        files[rel] = _record(path, previous, append=bool((old.get(rel) or {}).get("append")))
    data["files"] = files
    data["kind"] = kind
    _write(root, data)


def adopt_dir(directory: str | os.PathLike, kind: str) -> Path:
    """Create ``directory`` with an empty manifest; an existing one must be ours or empty.

    Raises :class:`OutputExistsError` for an existing directory with files not in a manifest:
    no manifest is ever written into a folder of someone else's.
    """
    root = Path(directory)
    if root.is_dir() and read_manifest(root) is not None:
        return root
    if root.is_dir() and any(root.iterdir()):
        lost = lost_files(root)
        raise OutputExistsError(
            f"{root} holds files hc-retrofit did not write ({_names(lost)}); choose a new directory"
        )
    root.mkdir(parents=True, exist_ok=True)
    _write(root, _new(kind))
    return root


def record(directory: str | os.PathLike, names: Iterable[str], *, append: Iterable[str] = ()) -> None:
    """Add files (or whole sub-directories, file by file) this process just wrote in ``directory``
    to its manifest; ``append``: logs that are only ever appended to (``metrics.jsonl``).

    Sub-directories with a manifest of their own are recorded by name (their files are theirs).
    Names that no longer exist are dropped from the manifest.
    """
    root = Path(directory)
    data = read_manifest(root)
    if data is None:
        raise RuntimeError(f"{root} has no manifest: create it with adopt_dir first")
    appended = set(append)
    files, dirs = data["files"], set(data["dirs"])
    for name in [*names, *appended]:
        path = root / name
        prefix = name.rstrip("/") + "/"
        if not path.exists() and not path.is_symlink():
            files.pop(name, None)
            for key in [k for k in files if k.startswith(prefix)]:
                del files[key]
            dirs = {d for d in dirs if d != name and not d.startswith(prefix)}
        elif path.is_dir() and not path.is_symlink():
            if read_manifest(path) is not None:
                dirs.add(name)
                continue
            present = set()
            for folder, subdirs, names_here in os.walk(path, followlinks=False):
                for sub in list(subdirs):
                    if read_manifest(Path(folder) / sub) is not None:  # its files are its own manifest's
                        dirs.add((Path(folder) / sub).relative_to(root).as_posix())
                        subdirs.remove(sub)
                for file_name in names_here:
                    file = Path(folder) / file_name
                    rel = file.relative_to(root).as_posix()
                    present.add(rel)
                    files[rel] = _record(file, files.get(rel))
            for key in [k for k in files if k.startswith(prefix) and k not in present]:
                del files[key]
            dirs = {d for d in dirs if not d.startswith(prefix) or (root / d).is_dir()}
        else:
            files[name] = _record(path, files.get(name), append=name in appended)
    data["files"], data["dirs"] = files, sorted(dirs)
    _write(root, data)


def claim(directory: str | os.PathLike, patterns: Iterable[str]) -> None:
    """Declare names (``fnmatch`` patterns, relative) this tool is about to write in ``directory``.

    What writing them leaves around while it runs (``.NAME.lock``, ``.NAME.PID-XXXX.partial``,
    ``.tmp-NAME``) is then ours too, so a run killed in the middle of a save stays replaceable.
    A claimed sub-directory with a manifest of its own counts as ours (checked against that
    manifest); claimed files count as ours only once recorded.
    """
    root = Path(directory)
    data = read_manifest(root)
    if data is None:
        raise RuntimeError(f"{root} has no manifest: create it with adopt_dir first")
    data["claims"] = sorted(set(data["claims"]) | set(patterns))
    _write(root, data)


_TRANSIENT = re.compile(r"\.(?:tmp-(?P<tmp>.+)|(?P<name>.+?)\.(?:lock|\d+-[^.]+\.(?:partial|old|replaced)))")


def _is_transient(rel: str, claims: list[str]) -> bool:
    """Whether ``rel`` is what writing a claimed name leaves around (see :func:`claim`)."""
    folder, _, name = rel.rpartition("/")
    match = _TRANSIENT.fullmatch(name)
    if not match:
        return False
    base = match.group("tmp") or match.group("name")
    target = f"{folder}/{base}" if folder else base
    return any(fnmatch.fnmatchcase(target, pattern) for pattern in claims)


def _claimed(rel: str, claims: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(rel, pattern) for pattern in claims)


# ----------------------------------------------------------------------------- checking
def lost_files(directory: str | os.PathLike) -> list[str]:
    """The files (relative paths) that deleting ``directory`` would lose: not written by this tool or
    changed since. Empty when the directory may be replaced."""
    root = Path(directory)
    data = read_manifest(root)
    if data is None:
        return [p.relative_to(root).as_posix() for p in _walk_files(root)] or ([] if _is_empty(root) else ["."])
    files, owned_dirs, claims = data["files"], set(data["dirs"]), data["claims"]
    lost = []
    for folder, subdirs, names in os.walk(root, followlinks=False):
        here = Path(folder)
        keep = []
        for sub in sorted(subdirs):
            rel = (here / sub).relative_to(root).as_posix()
            if _is_transient(rel, claims):
                continue
            if (here / sub).is_symlink():
                lost.append(rel)
            elif rel in owned_dirs or (_claimed(rel, claims) and read_manifest(here / sub) is not None):
                lost += [f"{rel}/{name}" for name in lost_files(here / sub)]
            else:
                keep.append(sub)
        subdirs[:] = keep
        for name in sorted(names):
            rel = (here / name).relative_to(root).as_posix()
            if rel in (MANIFEST, _MANIFEST_TMP) or _is_transient(rel, claims):
                continue
            entry = files.get(rel)
            if (here / name).is_symlink() or entry is None or not _unchanged(here / name, entry):
                lost.append(rel)
    return lost


def _is_empty(root: Path) -> bool:
    return not root.exists() or (root.is_dir() and not any(root.iterdir()))


def _names(lost: list[str]) -> str:
    shown = ", ".join(lost[:SHOWN])
    return shown + (f" and {len(lost) - SHOWN} more" if len(lost) > SHOWN else "")


def check_replaceable(directory: str | os.PathLike, flag: str = "--out", action: str = "--overwrite") -> None:
    """Refuse (one line, naming up to :data:`SHOWN` files) to replace ``directory`` if that would lose a file."""
    root = Path(directory)
    if _is_empty(root):
        return
    lost = lost_files(root)
    if not lost:
        return
    if read_manifest(root) is None:
        raise OutputExistsError(
            f"{flag} {root} was not written by hc-retrofit (it has no manifest of written files), so {action} "
            f"will not replace it ({_names(lost)}); move them away or choose a new directory"
        )
    raise OutputExistsError(
        f"{flag} {root} holds files hc-retrofit did not write or that changed since ({_names(lost)}); {action} "
        "would lose them: move them away or choose a new directory"
    )


# ----------------------------------------------------------------------------- locking
_held: dict[Path, list[Any]] = {}


def _lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


def _holder(path: Path) -> str:
    with contextlib.suppress(OSError, ValueError):
        return str(int(path.read_text(encoding="utf-8").strip()))
    return "unknown"


@contextlib.contextmanager
def output_lock(out: str | os.PathLike, flag: str = "--out") -> Iterator[Path]:
    """Hold the lock of output directory ``out`` (re-entrant within a process).

    Raises :class:`OutputExistsError` naming the pid of the process that holds it.
    """
    out = Path(out).expanduser().resolve()
    if out in _held:
        _held[out][1] += 1
        try:
            yield out
        finally:
            _held[out][1] -= 1
        return
    path = _lock_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = _acquire(path, out, flag)
    _held[out] = [handle, 1]
    try:
        yield out
    finally:
        _held.pop(out, None)
        with contextlib.suppress(OSError):
            path.unlink()
        handle.close()


def _acquire(path: Path, out: Path, flag: str) -> Any:
    """Open and lock ``path`` (fcntl where there is one, else an exclusive create)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        fcntl = None
    for _ in range(20):
        if fcntl is None:  # pragma: no cover
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR)
            except FileExistsError:
                break
            handle = os.fdopen(fd, "r+")
        else:
            handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - kept open while the lock is held
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.close()
                break
            try:  # the holder may have removed the file between our open and lock: lock the file on disk
                if os.fstat(handle.fileno()).st_ino != os.stat(path).st_ino:
                    handle.close()
                    continue
            except FileNotFoundError:
                handle.close()
                continue
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        return handle
    raise OutputExistsError(
        f"{flag} {out} is being written by another hc-retrofit process (pid {_holder(path)}); wait for it to "
        f"finish or choose another {flag}"
    )


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (on this machine)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
