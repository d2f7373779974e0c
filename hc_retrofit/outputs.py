"""What hc-retrofit may write over: the one policy every command's ``--out`` goes through.

The rule is *never delete what we did not write*, proved by a manifest (:mod:`hc_retrofit.ownership`):

* Every directory this tool writes carries a manifest of exactly the files it wrote.
  ``--overwrite`` replaces a directory only when every file in it is in its manifest and
  unchanged; otherwise it refuses and names the files it would lose.
* ``--out`` may never be ``/``, the home directory, the current directory or one of its parents,
  the installed package, a site-packages directory, the Hugging Face cache, or a directory that
  holds (or sits inside) an input (model, data, recipe), whatever the flags say.
* Replacement happens only after the new output is complete: it is written into a staging
  directory beside ``--out`` (named with the writer's pid) and swapped in by rename
  (:func:`replace_dir`), while the writer holds the output's lock (:func:`~hc_retrofit.ownership.output_lock`).

All checks run before any model is loaded, so a mistake costs nothing.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from hc_retrofit import ownership
from hc_retrofit.log import get_logger
from hc_retrofit.modeling.errors import OutputExistsError
from hc_retrofit.private_api import reports_full_disk

log = get_logger(__name__)

output_lock = ownership.output_lock
MARKER = ownership.MANIFEST
"""The manifest file that proves which files of a directory hc-retrofit wrote."""

LEFTOVER_SUFFIXES = (".partial", ".old", ".replaced")
"""Siblings of an output this module creates: staging, being deleted, set aside by ``--overwrite``."""


def write_marker(directory: str | os.PathLike, kind: str) -> None:
    """Make ``directory`` (new or empty) an hc-retrofit output of ``kind`` with an empty manifest."""
    ownership.adopt_dir(directory, kind)


def is_ours(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` has a manifest and holds only the unchanged files it lists."""
    path = Path(directory)
    if not path.is_dir() or path.is_symlink() or ownership.read_manifest(path) is None:
        return False
    return not ownership.lost_files(path)


def umask() -> int:
    """The process umask (read without changing it for good)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _protected_places() -> list[tuple[Path, str]]:
    """Directories no output may be, sit inside or contain: the package, site-packages, the HF cache."""
    import site
    import sysconfig

    places = [(Path(__file__).parent, "the installed hc-retrofit package")]
    for key in ("purelib", "platlib"):
        with contextlib.suppress(KeyError):
            places.append((Path(sysconfig.get_paths()[key]), "a Python site-packages directory"))
    with contextlib.suppress(AttributeError):
        places += [(Path(p), "a Python site-packages directory") for p in site.getsitepackages()]
    with contextlib.suppress(AttributeError):
        places.append((Path(site.getusersitepackages()), "a Python site-packages directory"))
    places.append((Path(sys.prefix) / "lib", "the Python installation"))
    with contextlib.suppress(Exception):
        from huggingface_hub import constants

        places += [(Path(constants.HF_HUB_CACHE), "the Hugging Face cache"), (Path(constants.HF_HOME), "HF_HOME")]
    out = []
    for path, what in places:
        with contextlib.suppress(OSError):
            out.append((path.expanduser().resolve(), what))
    return out


def _protected(out: Path) -> str | None:
    """Why ``out`` may never be an output directory, or ``None``."""
    cwd, home = Path.cwd().resolve(), Path.home().resolve()
    if out == Path(out.anchor):
        return "it is the filesystem root"
    if out == cwd:
        return "it is the current directory"
    if out in cwd.parents:
        return "it contains the current directory"
    if out == home or out in home.parents:
        return "it is (or contains) your home directory"
    for place, what in _protected_places():
        if out == place or place in out.parents:
            return f"it is inside {what} ({place})"
        if out in place.parents:
            return f"it contains {what} ({place})"
    return None


def check_output_dir(
    out_dir: str | os.PathLike,
    *,
    overwrite: bool,
    inputs: Iterable[str | os.PathLike | None] = (),
    flag: str = "--out",
    resume: bool = False,
) -> Path:
    """Check that ``out_dir`` may be written (and, with ``overwrite``, replaced); return it resolved.

    Args:
        out_dir: the output directory the user asked for.
        overwrite: whether an existing, non-empty ``out_dir`` may be replaced. Even then only a
            directory whose every file is in its manifest, unchanged, is replaced.
        inputs: paths the command reads (model dir, data file or dir, recipe); Hub ids and ``None``
            are skipped. ``out_dir`` may neither hold nor sit inside any of them.
        flag: the option name used in messages.
        resume: an existing ``out_dir`` is continued, not replaced: it must be an output of
            hc-retrofit (have a manifest); files added to it are kept.

    Raises:
        OutputExistsError: with a one-line message that names the problem and the fix.
    """
    out = Path(out_dir).expanduser().resolve()
    why = _protected(out)
    if why:
        raise OutputExistsError(f"{flag} {out}: {why}; hc-retrofit never writes there, choose a new directory")
    for item in inputs:
        if item is None or not str(item) or not Path(item).expanduser().exists():
            continue
        src = Path(item).expanduser().resolve()
        if out == src or out in src.parents:
            raise OutputExistsError(f"{flag} {out} holds the input {src}; choose a directory of its own")
        if src.is_dir() and src in out.parents:
            raise OutputExistsError(f"{flag} {out} is inside the input directory {src}; choose a directory outside it")
    if Path(out_dir).expanduser().is_symlink() or (out.exists() and not out.is_dir()):
        raise OutputExistsError(f"{flag} {out} exists and is not a directory; choose a directory path")
    if out.is_dir() and any(out.iterdir()):
        if resume and not overwrite:
            if ownership.read_manifest(out) is None:
                raise OutputExistsError(
                    f"{flag} {out} was not written by hc-retrofit (it has no manifest), so --resume will not write "
                    "into it; choose a new directory"
                )
        elif not overwrite:
            raise OutputExistsError(f"{flag} {out} already exists; pass --overwrite to replace it, or choose a new one")
        else:
            ownership.check_replaceable(out, flag)
    _check_writable(out, flag)
    report_leftovers(out)
    return out


def _check_writable(out: Path, flag: str) -> None:
    """Fail now, not after loading a model, if ``out`` cannot be created or written."""
    probe = out
    while not probe.exists():
        probe = probe.parent
    if probe == out and not out.is_dir():
        probe = out.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise OutputExistsError(f"{flag} {out}: {probe} is not writable; choose a directory you can write to")


def _leftover_pid(path: Path, out: Path) -> int | None:
    """The writer's pid in a leftover sibling name ``.NAME.PID-XXXX.SUFFIX`` (``None`` if it has none)."""
    match = re.fullmatch(re.escape(f".{out.name}.") + r"(\d+)-[^.]+\.(partial|old|replaced)", path.name)
    return int(match.group(1)) if match else None


def leftovers(out: Path) -> list[Path]:
    """Staging / old / set-aside siblings of ``out`` left by a process that is gone."""
    found = []
    if not out.parent.is_dir():
        return found
    for path in out.parent.glob(f".{out.name}.*"):
        if not path.name.endswith(LEFTOVER_SUFFIXES) or not path.is_dir() or path.is_symlink():
            continue
        pid = _leftover_pid(path, out)
        if pid is None or (pid != os.getpid() and not ownership.pid_alive(pid)):
            found.append(path)
    return sorted(found)


def report_leftovers(out: Path) -> list[Path]:
    """Warn about what an interrupted run left beside ``out`` (see :func:`clean_leftovers`)."""
    found = leftovers(out)
    for path in found:
        if path.name.endswith(".replaced"):
            log.warning(
                "%s: the previous %s, set aside by --overwrite and kept when the new run failed; remove it "
                "yourself once you no longer need it",
                path,
                out.name,
            )
        else:
            log.warning(
                "%s: a partial output left by an interrupted run; it is removed when %s is next written", path, out.name
            )
    return found


def clean_leftovers(out: Path) -> None:
    """Remove the staging and half-deleted siblings of ``out`` left by processes that are gone.

    Call only while holding ``out``'s lock. A set-aside previous output (``.replaced``) is kept:
    it may be the only copy of a run, and the user was told where it is.
    """
    for path in leftovers(out):
        if not path.name.endswith(".replaced"):
            shutil.rmtree(path, ignore_errors=True)


def _sibling(out: Path, suffix: str) -> Path:
    """A fresh hidden directory beside ``out`` named ``.NAME.PID-XXXX.SUFFIX``, with umask-honouring mode."""
    out.parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}-", suffix=suffix, dir=out.parent))
    os.chmod(path, 0o777 & ~umask())  # mkdtemp makes 0700: the output is made like any other directory
    return path


def staging_dir(out: Path, suffix: str = ".partial") -> Path:
    """A fresh hidden sibling of ``out`` to write into; leftovers of processes that are gone are removed first."""
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(out)
    return _sibling(out, suffix)


def replace_dir(new: Path, out: Path, kind: str | None = None, hashed: dict[str, dict] | None = None) -> None:
    """Move the complete ``new`` to ``out``. With ``kind``, ``new`` is first sealed (its manifest lists
    every file in it; ``hashed``: see :func:`~hc_retrofit.ownership.seal`). An existing ``out`` is checked
    once more (every file ours and unchanged), swapped out, then removed."""
    if kind is not None:
        honour_umask(new)
        ownership.seal(new, kind, hashed)
    if out.exists():
        ownership.check_replaceable(out)
        old = _sibling(out, ".old")
        old.rmdir()
        os.rename(out, old)
        os.rename(new, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(new, out)


def honour_umask(directory: Path) -> None:
    """Give what was written under ``directory`` the modes the umask asks for (0666/0777 minus it).

    Some writers create private files whatever the umask (safetensors writes weights as 0600);
    an output is shared like any file the user makes. Hard-linked files (a ``--link`` convert's
    shards: the same file as the input) are left alone.
    """
    mask = umask()
    for folder, dirs, names in os.walk(directory, followlinks=False):
        for name, wanted in [*((d, 0o777 & ~mask) for d in dirs), *((n, 0o666 & ~mask) for n in names)]:
            path = Path(folder) / name
            st = path.lstat()
            if path.is_symlink() or (not path.is_dir() and st.st_nlink > 1) or st.st_mode & 0o777 == wanted:
                continue
            os.chmod(path, wanted)


def abandon(tmp: Path, err: BaseException, out: Path) -> BaseException | None:
    """Remove staging directory ``tmp`` after ``err``; return an ``OSError`` to raise instead when ``err``
    is a full disk reported as something else (safetensors' ``SafetensorError``, a ``RuntimeError``)."""
    shutil.rmtree(tmp, ignore_errors=True)
    if isinstance(err, OSError):
        return None
    if reports_full_disk(err):
        return OSError(errno.ENOSPC, "No space left on device", str(out.parent))
    return None


@contextlib.contextmanager
def staged(out: Path, kind: str, tmp: Path | None = None, hashed: dict[str, dict] | None = None) -> Iterator[Path]:
    """Write a new output into a staging sibling of ``out`` (``tmp``, else a fresh one), put in place
    by :func:`replace_dir` only when the block completes. On any error (Ctrl-C included) the staging
    directory is removed, ``out`` is left as it was, and a full disk reported as something else is
    raised as ``OSError`` (see :func:`abandon`). ``hashed``: filled by the block with the
    :func:`~hc_retrofit.file_hashes.hash_record` of files it already hashed (the manifest reuses them)."""
    tmp = staging_dir(out) if tmp is None else tmp
    try:
        yield tmp
        replace_dir(tmp, out, kind=kind, hashed=hashed)
    except BaseException as err:
        instead = abandon(tmp, err, out)
        if instead is not None:
            raise instead from err
        raise


def set_aside(out: Path) -> Path:
    """Rename an existing output out of the way (kept until the new one is complete); return where it went."""
    aside = _sibling(out, ".replaced")
    aside.rmdir()
    os.rename(out, aside)
    return aside


def check_output_file(path: str | os.PathLike, flag: str, suffixes: Iterable[str] = ()) -> Path:
    """Fail now (before any work) if file ``path`` cannot be written (or has none of ``suffixes``); return it resolved."""
    out = Path(path).expanduser().resolve()
    if out.is_dir():
        raise OutputExistsError(f"{flag} {out} is a directory; give a file name such as {out / 'plot.png'}")
    allowed = [s.lower() for s in suffixes]
    if allowed and out.suffix.lower() not in allowed:
        raise OutputExistsError(
            f"{flag} {out}: the file type is chosen by its suffix, one of {', '.join(allowed)}; e.g. "
            f"{out.with_suffix(allowed[0]).name}"
        )
    _check_writable(out, flag)
    return out
