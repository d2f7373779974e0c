"""Every use the tool makes of another library's private API or undocumented text, in one place.

Each function names the private attribute (or message format) it relies on, why no public API
does the job, and the library version it was checked against; ``tests/test_private_api.py``
fails when one of them disappears or changes, so an upgrade breaks here first, loudly, instead
of somewhere deep in a run. The code that ships inside checkpoints has its own (torch-only)
counterpart, :mod:`hc_retrofit.modeling.private_api`.

Checked against: accelerate 1.16.0, transformers 5.24.0, datasets 5.2.0, typer 0.29.2.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Mapping
from types import ModuleType
from typing import Any


def reset_accelerate_state() -> None:
    """Forget accelerate's process-wide ``AcceleratorState`` / ``PartialState`` singletons.

    Private: ``AcceleratorState._reset_state(reset_partial_state=True)`` (accelerate 1.16.0).
    accelerate keeps one shared state per process and refuses an ``Accelerator`` with other
    settings (mixed precision, CPU) once it exists; in-process runs (the demo, tests, a notebook
    training twice) each need their own. accelerate has no public reset (its own tests use this).
    """
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def auto_class_model_names() -> dict[str, Mapping[str, Any]]:
    """``{Auto* class name: {model_type: model class name(s)}}`` for every ``Auto*`` model class.

    Private: ``transformers.models.auto.auto_factory._BaseAutoModelClass`` (what makes a class
    an ``Auto*`` model class) and ``auto_cls._model_mapping._model_mapping`` (transformers
    5.24.0). The public ``MODEL_FOR_*_MAPPING_NAMES`` tables hold the same names, but nothing
    public says which table belongs to which ``Auto*`` class, and ``_model_mapping.values()``
    would import every model class of the library.
    """
    from transformers.models.auto import modeling_auto
    from transformers.models.auto.auto_factory import _BaseAutoModelClass

    found: dict[str, Mapping[str, Any]] = {}
    for name in sorted(vars(modeling_auto)):
        auto = getattr(modeling_auto, name)
        is_auto = isinstance(auto, type) and issubclass(auto, _BaseAutoModelClass) and not name.startswith("_")
        if is_auto:  # (the private bases, e.g. ``_BaseAutoBackboneClass``, map nothing)
            found[name] = auto._model_mapping._model_mapping
    return found


def dataset_fingerprint(dataset: Any) -> str:
    """The fingerprint ``datasets`` keys its cache on for ``dataset`` (a ``datasets.Dataset``).

    Private: ``Dataset._fingerprint`` (datasets 5.2.0). Tokenising with a closure over a tokenizer
    needs an explicit ``new_fingerprint`` (datasets cannot hash every tokenizer deterministically),
    which must derive from the documents' fingerprint; datasets exposes it under no public name.
    """
    return dataset._fingerprint


def click_exceptions_module() -> ModuleType:
    """The module of the click exception classes typer raises (``UsageError``, ``NoArgsIsHelpError`` ...).

    Private: ``typer._click.exceptions`` (typer 0.29.2 vendors click as ``typer._click``; older
    typer used ``click`` itself). typer re-exports only ``BadParameter`` of them, and catching
    ``click``'s own classes misses the vendored ones.
    """
    try:
        from typer._click import exceptions
    except ImportError:  # typer before it vendored click
        from click import exceptions
    return exceptions


_SHARED_TENSORS = re.compile(r"Removed shared tensor (\{.*?\}|\[.*?\]) while saving")


def removed_shared_tensors(message: str) -> set[str] | None:
    """The tensor names of accelerate's "Removed shared tensor {...} while saving" log message, else ``None``.

    Message format of ``accelerate.utils.other.clean_state_dict_for_safetensors`` (accelerate
    1.16.0), logged on every ``save_state`` of a model with tied weights. It is an f-string with
    no record arguments and no warning category, so its text is the only way to tell a known tie
    (harmless) from an unexpected one.
    """
    found = _SHARED_TENSORS.search(message)
    return None if found is None else set(re.findall(r"'([^']+)'", found.group(1)))


#: The C library's texts for a full disk and an exhausted quota, as Rust's and C++'s I/O errors print them.
_FULL_DISK_TEXTS = tuple(os.strerror(code).lower() for code in (errno.ENOSPC, errno.EDQUOT))


def reports_full_disk(err: BaseException) -> bool:
    """Whether ``err`` (not an ``OSError``) is a write that failed because the disk or quota is full.

    Undocumented text: safetensors' ``SafetensorError`` (a Rust ``io::Error``, safetensors 0.7) and
    torch's ``RuntimeError`` from its C++ writer carry the operating system's message but no
    ``errno``, so the only signal is that message: ``strerror(ENOSPC)`` / ``strerror(EDQUOT)``
    ("No space left on device", "Disk quota exceeded" with glibc), read from the C library rather
    than spelled here.
    """
    text = str(err).lower()
    return any(t in text for t in _FULL_DISK_TEXTS)
