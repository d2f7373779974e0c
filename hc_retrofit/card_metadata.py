"""What the base model states about itself for a model card: ``license`` and ``base_model``.

Read from the base's files on this machine (its directory, or its snapshot in the Hugging Face
cache): the front matter of its own card, else the heading of its LICENSE file. Nothing is
downloaded: a base whose files are not here states nothing, and the card says so.
"""

from __future__ import annotations

import os
from pathlib import Path

from hc_retrofit.checkpoint_format import BASE_KEY, read_config_dict

BASE_CARD_FILE = "README.md"

LICENSE_NAMES = (
    ("MIT License", "mit"),
    ("Apache License", "apache-2.0"),
    ("BSD 3-Clause", "bsd-3-clause"),
    ("BSD 2-Clause", "bsd-2-clause"),
    ("GNU GENERAL PUBLIC LICENSE", "gpl-3.0"),
    ("Creative Commons Attribution 4.0", "cc-by-4.0"),
)
"""Headings of LICENSE files -> the Hub's license identifiers."""


def _is_local_path(value: str) -> bool:
    """Absolute (or home-relative) local paths: what must not be published."""
    return value.startswith(("/", "~", "\\")) or (len(value) > 2 and value[1] == ":" and value[2] in "\\/")


def _base_folder(base: str) -> Path | None:
    """The base model's files on this machine: its directory, or its snapshot in the HF cache."""
    local = Path(base).expanduser()
    if local.is_dir():
        return local
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(base, "config.json")
    except Exception:  # not a valid repo id, no cache: nothing to read
        return None
    return Path(found).parent if isinstance(found, str) else None


def base_card_metadata(base: str | None) -> dict[str, str]:
    """``license`` and ``base_model`` as the base model states them (its card's front matter, its
    LICENSE file), if its files are on this machine; keys it does not state are absent."""
    found: dict[str, str] = {}
    folder = _base_folder(base) if base else None
    if folder is None:
        return found
    card = folder / BASE_CARD_FILE
    if card.is_file():
        try:
            from huggingface_hub.repocard import metadata_load

            meta = metadata_load(card) or {}
        except Exception:  # an unreadable front matter states nothing
            meta = {}
        for key in ("license", "base_model"):
            value = meta.get(key)
            if isinstance(value, list) and value:
                value = value[0]
            if isinstance(value, str) and value:
                found[key] = value
    licence_file = next((folder / n for n in ("LICENSE", "LICENSE.txt", "LICENSE.md") if (folder / n).is_file()), None)
    if "license" not in found and licence_file is not None:
        text = licence_file.read_text(encoding="utf-8", errors="replace")[:4000]
        found.update(("license", spdx) for heading, spdx in LICENSE_NAMES[::-1] if heading in text)
    return found


def card_metadata(path: str | os.PathLike, license: str | None = None, base_model: str | None = None) -> dict:
    """``license`` and ``base_model`` for the card of checkpoint ``path``: given, else the Hub id of its base,
    else what the base's own card or LICENSE states (a key is absent when nothing states it)."""
    raw = read_config_dict(path)
    base = str(raw.get(BASE_KEY) or "")
    local_base = _is_local_path(base) or base.startswith(".")
    stated = base_card_metadata(base) if base else {}
    meta = {}
    if license or stated.get("license"):
        meta["license"] = license or stated["license"]
    hub_base = base if base and not local_base and base.count("/") <= 1 else None
    if base_model or hub_base or stated.get("base_model"):
        meta["base_model"] = base_model or hub_base or stated["base_model"]
    return meta
