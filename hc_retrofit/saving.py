"""Saving a converted model as a checkpoint that loads anywhere (see :mod:`hc_retrofit.checkpoint_format`)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from hc_retrofit import outputs, ownership
from hc_retrofit.checkpoint_format import BASE_ARCH_KEY, BASE_KEY, BASE_TYPE_KEY, METADATA_KEY, VERSION_KEY
from hc_retrofit.modeling.errors import NotConvertedError
from hc_retrofit.modeling.patch import is_converted
from hc_retrofit.remote_code import write_remote_code


def check_output_dir(out_dir: Path, *, overwrite: bool, source: str | os.PathLike | None = None) -> Path:
    """Refuse an ``out_dir`` this tool may not write; see :func:`hc_retrofit.outputs.check_output_dir`."""
    return outputs.check_output_dir(out_dir, overwrite=overwrite, inputs=[source])


def write_converted_files(
    directory: Path, model: Any, tokenizer: Any = None, *, base: str | None, metadata: dict | None = None
) -> dict[str, Any]:
    """Beside the weights and ``config.json`` in ``directory``: the tokenizer, the remote code, and the
    converted config keys (model type, auto_map, base, version, metadata). Returns the keys written.

    Shared by :func:`save_converted` and the streaming convert, so both write the same directory.
    """
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    keys = write_remote_code(directory, model)
    from hc_retrofit.version import __version__

    keys.update({BASE_KEY: base, VERSION_KEY: __version__})
    if metadata:
        keys[METADATA_KEY] = metadata
    config_file = directory / "config.json"
    data = json.loads(config_file.read_text(encoding="utf-8"))
    data.update(keys)
    config_file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return keys


def save_converted(
    model: Any,
    out_dir: str | os.PathLike,
    tokenizer: Any = None,
    *,
    overwrite: bool = False,
    max_shard_size: str | int = "2GB",
    extra_metadata: dict | None = None,
    base_model: str | None = None,
) -> Path:
    """Save converted ``model`` (plus ``tokenizer``) to ``out_dir`` so that it loads anywhere.

    The directory is written next to ``out_dir`` under a temporary name and renamed at the end,
    so a failure or Ctrl-C never leaves a partial checkpoint. ``base_model`` (default: the id or
    path recorded earlier, else ``model.config.name_or_path``) is stored as ``hc_retrofit_base``;
    ``extra_metadata`` (JSON values) is merged into ``hc_retrofit_metadata``.

    Raises:
        NotConvertedError: ``model`` has no hyper-connections.
        OutputExistsError: ``out_dir`` exists and ``overwrite`` is false.
    """
    if not is_converted(model):
        raise NotConvertedError("the model has no hyper-connections; call hc_retrofit.convert(model) before saving")
    out = check_output_dir(Path(out_dir), overwrite=overwrite)
    with ownership.output_lock(out):
        keys = _save_staged(model, out, tokenizer, max_shard_size, base_model, extra_metadata)
    for key in (BASE_KEY, BASE_TYPE_KEY, BASE_ARCH_KEY):
        setattr(model.config, key, keys[key])
    return out


def _save_staged(
    model: Any, out: Path, tokenizer: Any, max_shard_size: str | int, base_model: str | None, extra: dict | None
) -> dict[str, Any]:
    """Write into a staging directory beside ``out``, seal its manifest, swap it in; return the config keys."""
    config = model.config
    base = base_model or getattr(config, BASE_KEY, None) or getattr(config, "name_or_path", None) or None
    if base and Path(base).expanduser().is_dir():  # a local base: absolute, so verify works from any cwd
        base = str(Path(base).expanduser().resolve())
    metadata = {**(getattr(config, METADATA_KEY, None) or {}), **(extra or {})}
    with outputs.staged(out, kind="checkpoint") as tmp:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        keys = write_converted_files(tmp, model, tokenizer, base=base, metadata=metadata)
    return keys
