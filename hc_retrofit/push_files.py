"""Which files a push uploads, and the text files among them with local paths cut.

The checkpoint's own files only: a link out of the directory, a broken link or a loop is refused,
hidden files and partial downloads are left out. Text files (configs, cards, logs) with a local
path in them are sent from memory with the path cut (:mod:`hc_retrofit.local_paths`), so the
user's directory is never written; vocabularies are sent exactly as they are.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from hc_retrofit.local_paths import scrub_json, scrub_text
from hc_retrofit.modeling.errors import HubError

IGNORE_PATTERNS = [".*", "**/.*", "__pycache__", "**/__pycache__/**", "*.partial"]


def files_to_upload(path: Path) -> list[str]:
    """The checkpoint's files, without following any link out of it (a link out is refused)."""
    from huggingface_hub.utils import filter_repo_objects

    root = path.resolve()
    every = []
    for folder, dirs, names in os.walk(path, followlinks=False):
        for name in [*names, *dirs]:
            item = Path(folder) / name
            if not item.is_symlink():
                continue
            try:
                target = item.resolve(strict=True)
            except (OSError, RuntimeError):  # a loop, or a link to nothing
                raise HubError(
                    f"{item} is a broken link or a link loop: push uploads only the checkpoint's own files; "
                    "remove the link"
                ) from None
            if root not in target.parents:
                raise HubError(
                    f"{item} is a link to {item.resolve()}, outside the checkpoint: push uploads only the "
                    "checkpoint's own files; replace the link with a copy or remove it"
                )
        every += [str((Path(folder) / n).relative_to(path)).replace(os.sep, "/") for n in names]
    return sorted(filter_repo_objects(every, ignore_patterns=IGNORE_PATTERNS))


SCRUBBED_SUFFIXES = (".json", ".md", ".txt", ".yaml", ".yml", ".jsonl", ".toml", ".cfg")
"""Text files whose local paths are cut before upload (sent from memory, the folder is not written)."""
NOT_SCRUBBED = frozenset({"tokenizer.json", "vocab.json", "vocab.txt", "merges.txt", "added_tokens.json"})
"""Vocabularies: their tokens may look like paths and must stay exactly as they are."""
SCRUB_LIMIT = 16 << 20


def publishable_files(path: Path, files: list[str]) -> tuple[dict[str, bytes], list[tuple[str, str]]]:
    """``{name: content}`` of the text files of ``files`` whose local paths were cut, and ``(name, path)``
    for every path cut. Files with nothing to cut are not in the dict (they are uploaded as they are)."""
    out: dict[str, bytes] = {}
    found: list[tuple[str, str]] = []
    for name in files:
        file = path / name
        if not name.lower().endswith(SCRUBBED_SUFFIXES) or Path(name).name in NOT_SCRUBBED or not file.is_file():
            continue
        if file.stat().st_size > SCRUB_LIMIT:
            continue
        text = file.read_text(encoding="utf-8", errors="replace")
        cleaned: str
        if name.endswith(".json"):
            try:
                data, paths = scrub_json(json.loads(text))
                cleaned = json.dumps(data, indent=2, sort_keys=name == "config.json") + "\n"
            except ValueError:
                cleaned, paths = scrub_text(text)
        else:
            cleaned, paths = scrub_text(text)
        if paths:
            out[name] = cleaned.encode("utf-8")
            found += [(name, p) for p in paths]
    return out, found
