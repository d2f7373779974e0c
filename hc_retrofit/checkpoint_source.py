"""A local directory for a checkpoint named by a path or by a Hugging Face Hub id."""

from __future__ import annotations

import os
from pathlib import Path

from hc_retrofit.log import first_line
from hc_retrofit.modeling.errors import CheckpointError
from hc_retrofit.repo_ids import looks_like_path


def resolve_checkpoint(path_or_repo_id: str | os.PathLike, *, revision: str | None = None) -> Path:
    """A local directory for a checkpoint given as a directory or as a Hub id (downloaded, or from the cache)."""
    local = Path(path_or_repo_id).expanduser()
    name = str(path_or_repo_id)
    if local.exists() or looks_like_path(name):
        return local
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, revision=revision))
    except Exception as err:  # offline, unknown repo, no access: every one is the user's to fix
        raise CheckpointError(
            f"cannot load {name!r}: it is not a local directory, and it could not be downloaded from the Hugging Face "
            f"Hub or found in its cache ({first_line(err)})"
        ) from err
