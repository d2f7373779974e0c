"""Telling a Hugging Face Hub id from a local path, and refusing ids the Hub would reject."""

from __future__ import annotations

import re

from hc_retrofit.modeling.errors import CheckpointError

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?")


def looks_like_path(name: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else is meant as a local path."""
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1


def is_valid_repo_id(name: str) -> bool:
    """Whether ``name`` is a Hub id: ``NAME`` or ``OWNER/NAME`` (letters, digits, ``-_.``, no ``..`` or ``--``)."""
    return bool(name) and _REPO_ID.fullmatch(name) is not None and ".." not in name and "--" not in name


def check_repo_id(name: str) -> None:
    """A Hub id must look like ``NAME`` or ``OWNER/NAME``, else one clear line."""
    if not is_valid_repo_id(name):
        raise CheckpointError(
            f"{name!r} is neither a local directory nor a valid Hub id (OWNER/NAME with letters, digits, '-', '_', "
            "'.'); check the spelling or the path"
        )
