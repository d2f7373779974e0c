"""What hc-retrofit may write over: the one policy every command's ``--out`` goes through.

The rule is *never delete what we did not write*:

* Every directory this tool creates (a converted checkpoint, a training run, a demo) carries a
  marker file, :data:`MARKER`. ``--overwrite`` replaces only a directory that has it (or that is
  recognisably ours from before the marker existed: a converted checkpoint, a run layout).
* ``--out`` may never be ``/``, the home directory, the current directory or one of its parents,
  a directory that holds (or sits inside) an input (model, data, recipe), whatever the flags say.
* Replacement happens only after the new output is complete: the new directory is written beside
  the old one and swapped in by rename (:func:`replace_dir`).

All checks run before any model is loaded, so a mistake costs nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from hc_retrofit.modeling.errors import OutputExistsError

MARKER = ".hc-retrofit-output"
"""File that marks a directory as written by hc-retrofit (JSON: which command wrote it)."""

RUN_ENTRIES = frozenset(
    {"metrics.jsonl", "summary.json", "loss.png", "final", "checkpoints", "logs", "runs", "compare.json", MARKER}
)
"""What a training / compare run directory may contain; a directory of only these is a run of ours."""


def write_marker(directory: str | os.PathLike, kind: str) -> None:
    """Mark ``directory`` as an hc-retrofit output of ``kind`` (``checkpoint``, ``run``, ``demo``, ...)."""
    import hc_retrofit

    (Path(directory) / MARKER).write_text(
        json.dumps({"kind": kind, "version": hc_retrofit.__version__}) + "\n", encoding="utf-8"
    )


def is_ours(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` was written by hc-retrofit (so ``--overwrite`` may replace it)."""
    path = Path(directory)
    if not path.is_dir() or path.is_symlink():
        return False
    if (path / MARKER).is_file():
        return True
    from hc_retrofit.checkpoint_format import is_converted_dir  # outputs of versions before the marker

    if is_converted_dir(path):
        return True
    names = {p.name for p in path.iterdir()}
    return "metrics.jsonl" in names and names <= RUN_ENTRIES


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
    return None


def check_output_dir(
    out_dir: str | os.PathLike,
    *,
    overwrite: bool,
    inputs: Iterable[str | os.PathLike | None] = (),
    flag: str = "--out",
) -> Path:
    """Check that ``out_dir`` may be written (and, with ``overwrite``, replaced); return it resolved.

    Args:
        out_dir: the output directory the user asked for.
        overwrite: whether an existing, non-empty ``out_dir`` may be replaced. Even then only a
            directory of ours (:func:`is_ours`) is replaced.
        inputs: paths the command reads (model dir, data file or dir, recipe); Hub ids and ``None``
            are skipped. ``out_dir`` may neither hold nor sit inside any of them.
        flag: the option name used in messages.

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
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise OutputExistsError(f"{flag} {out} exists and is not a directory; choose a directory path")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise OutputExistsError(f"{flag} {out} already exists; pass --overwrite to replace it, or choose a new one")
        if not is_ours(out):
            raise OutputExistsError(
                f"{flag} {out} was not written by hc-retrofit (no {MARKER} marker), so --overwrite will not replace "
                "it; remove it yourself or choose a new directory"
            )
    _check_writable(out, flag)
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


def staging_dir(out: Path, suffix: str = ".partial") -> Path:
    """A fresh hidden sibling of ``out`` to write into; stale ones from killed runs are removed first."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.*{suffix}"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)  # ours: only this module makes these names
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=suffix, dir=out.parent))


def replace_dir(new: Path, out: Path) -> None:
    """Move the complete ``new`` to ``out``; an existing ``out`` (checked by the caller) is swapped out, then removed."""
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        old.rmdir()
        os.rename(out, old)
        os.rename(new, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(new, out)


def set_aside(out: Path) -> Path:
    """Rename an existing output out of the way (kept until the new one is complete); return where it went."""
    aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".replaced", dir=out.parent))
    aside.rmdir()
    os.rename(out, aside)
    return aside


def check_output_file(path: str | os.PathLike, flag: str) -> Path:
    """Fail now (before any work) if file ``path`` cannot be written; return it resolved."""
    out = Path(path).expanduser().resolve()
    if out.is_dir():
        raise OutputExistsError(f"{flag} {out} is a directory; give a file name such as {out / 'plot.png'}")
    _check_writable(out, flag)
    return out
