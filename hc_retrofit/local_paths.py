"""Strings that name a place on this machine, found and cut out of what ``push`` publishes.

A checkpoint records where things came from: the base model, the training data, a run's
settings. On the Hub those are meaningless at best and reveal user names and directory layouts at
worst. :func:`scrub_json` and :func:`scrub_text` replace every string that looks like a local
path with its last component (``/home/me/data/corpus.txt`` -> ``corpus.txt``) and return what they
replaced, so ``push --dry-run`` can list it.

Looks like a local path: absolute (``/a/b``, ``~/a``, ``C:\\a``) or explicitly relative
(``./a``, ``../a``) anywhere; and, as the value of a key that names a file or model
(:data:`PATH_KEYS`), any value with a directory part that is not a Hub id (``data/corpus.txt``).
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Any

from hc_retrofit.checkpoint_format import BASE_KEY

PATH_KEYS = frozenset(
    {
        "data",
        "model",
        "recipe",
        "out",
        "out_dir",
        "cache_dir",
        "final_dir",
        "plot",
        BASE_KEY,
        "_name_or_path",
        "name_or_path",
        "base_model",
        "tokenizer_file",
        "data_files",
        "converted_dir",
    }
)
"""Keys whose values are paths or Hub ids."""
HUB_KEYS = frozenset({"data", "model", BASE_KEY, "_name_or_path", "name_or_path", "base_model"})
"""Of :data:`PATH_KEYS`, those whose value may be a Hub id (``org/name``) instead of a path."""
_DATA_SUFFIX = re.compile(r"\.(txt|jsonl?|parquet|csv|tsv|arrow|gz|zst|yaml|yml|md|safetensors|bin)$", re.I)
_IN_TEXT = re.compile(
    r"(?<![\w.:/~\\-])(?:~(?:/[\w.+@-]+)+|(?:/[\w.+@-]+){2,}/?|\.{1,2}(?:/[\w.+@-]+)+|[A-Za-z]:\\[^\s\"'`<>|]+)"
)


def _whole_value_is_path(value: str, key: str | None) -> bool:
    if not value or "\n" in value or len(value) > 4096:
        return False
    if value.startswith(("/", "~", "./", "../", "\\")) or re.match(r"[A-Za-z]:[\\/]", value):
        return True
    if key in PATH_KEYS and key not in HUB_KEYS:
        return "://" not in value
    if key in PATH_KEYS and ("/" in value or "\\" in value):
        hub_id = value.count("/") == 1 and not _DATA_SUFFIX.search(value) and not value.startswith(".")
        return not hub_id
    return key in PATH_KEYS and bool(_DATA_SUFFIX.search(value)) and key not in ("model", BASE_KEY)


def _last_part(path: str) -> str:
    name = PurePosixPath(path.replace("\\", "/").rstrip("/")).name
    return name or "."


def scrub_text(text: str) -> tuple[str, list[str]]:
    """``text`` with every local-looking path cut to its last component, and the paths found."""
    found: list[str] = []

    def cut(match: re.Match[str]) -> str:
        found.append(match.group(0))
        return _last_part(match.group(0))

    return _IN_TEXT.sub(cut, text), found


def scrub_json(data: Any, key: str | None = None) -> tuple[Any, list[str]]:
    """``data`` (parsed JSON) with local paths cut (see the module docstring), and the paths found."""
    found: list[str] = []

    def clean(value: Any, name: str | None) -> Any:
        if isinstance(value, str):
            if _whole_value_is_path(value, name):
                found.append(value)
                return _last_part(value)
            cleaned, inner = scrub_text(value)
            found.extend(inner)
            return cleaned
        if isinstance(value, dict):
            return {k: clean(v, k) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v, name) for v in value]
        return value

    return clean(data, key), found
