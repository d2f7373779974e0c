"""What a converted checkpoint directory contains, and the one reader of its safetensors headers.

A converted checkpoint is an ordinary transformers directory (safetensors, sharded above
``max_shard_size``; tokenizer and generation config beside it) whose ``config.json`` carries:

* ``hc_retrofit``: the :class:`~hc_retrofit.HCConfig` settings (:data:`CONFIG_KEY`);
* ``hc_retrofit_structure``: the adapter's structure, so loaders rebuild it without discovery;
* ``model_type: "hc_retrofit_<base type>"``: unknown to plain transformers, so a load without
  ``trust_remote_code`` fails loudly instead of silently dropping the HC tensors;
* ``auto_map``: the copied modeling files (:mod:`hc_retrofit.remote_code`);
* ``hc_retrofit_base_model_type`` / ``hc_retrofit_base_architecture``: the base's type and class;
* ``hc_retrofit_base``: the base model id or (absolute) path;
* ``hc_retrofit_version`` and ``hc_retrofit_code_sha256``: the writer's version, and the SHA-256
  of the copied modeling files;
* ``hc_retrofit_metadata``: optional JSON values (e.g. a training summary);
* ``hc_retrofit_attention_interface``: whether the base family's attention goes through
  transformers' attention interface, which serving engines' Transformers backends need.

The keys the shipped modeling code reads are defined beside that code (:mod:`hc_retrofit.modeling`
may import nothing from the tool) and re-exported here, so the tool spells every key in one place.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hc_retrofit.modeling.config import BASE_ARCH_KEY, BASE_TYPE_KEY, CONFIG_KEY, MODEL_TYPE_PREFIX
from hc_retrofit.modeling.errors import CheckpointError, NotConvertedError
from hc_retrofit.modeling.families import STRUCTURE_KEY

if TYPE_CHECKING:
    import torch

__all__ = [
    "ATTENTION_INTERFACE_KEY",
    "BASE_ARCH_KEY",
    "BASE_KEY",
    "BASE_TYPE_KEY",
    "CODE_HASH_KEY",
    "CONFIG_KEY",
    "HC_SHARD",
    "INDEX_FILE",
    "METADATA_KEY",
    "MODEL_TYPE_PREFIX",
    "SINGLE_FILE",
    "STRUCTURE_KEY",
    "ST_DTYPES",
    "TOKENIZER_FILES",
    "VERSION_KEY",
    "SafetensorsHeader",
    "check_weight_files",
    "is_converted_dir",
    "read_config_dict",
    "read_header",
    "require_converted_dir",
    "st_name",
    "torch_dtype",
]

BASE_KEY = "hc_retrofit_base"
VERSION_KEY = "hc_retrofit_version"
CODE_HASH_KEY = "hc_retrofit_code_sha256"
METADATA_KEY = "hc_retrofit_metadata"
ATTENTION_INTERFACE_KEY = "hc_retrofit_attention_interface"

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
HC_SHARD = "model-hc-retrofit.safetensors"
"""The shard holding only the HC tensors (written by the streaming convert)."""
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
)

ST_DTYPES: dict[str, str] = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}
"""safetensors dtype names -> torch dtype names (the ones a checkpoint of ours may hold).

Names, not ``torch`` objects: this module stays importable without torch, so the shard copy of
a streamed convert starts before torch is imported (:mod:`hc_retrofit.shard_copy`)."""


def torch_dtype(st_name: object) -> torch.dtype | None:
    """The torch dtype of safetensors dtype name ``st_name`` (``None``: not one :data:`ST_DTYPES` knows)."""
    import torch

    name = ST_DTYPES.get(st_name) if isinstance(st_name, str) else None
    return getattr(torch, name) if name else None


def st_name(dtype: torch.dtype) -> str:
    """The safetensors dtype name of torch ``dtype`` (``KeyError``: one safetensors cannot hold)."""
    return {v: k for k, v in ST_DTYPES.items()}[str(dtype).removeprefix("torch.")]


# ----------------------------------------------------------------------------- config.json
def read_config_dict(path: str | os.PathLike) -> dict[str, Any]:
    """The ``config.json`` of checkpoint directory ``path`` as a dict (clear error if there is none)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory")
    file = path / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{path} is not a model checkpoint: it has no config.json")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{file} is not valid JSON: {err}") from err


def is_converted_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a converted checkpoint directory (its config has :data:`CONFIG_KEY` settings)."""
    try:
        return isinstance(read_config_dict(path).get(CONFIG_KEY), dict)
    except CheckpointError:
        return False


def require_converted_dir(path: str | os.PathLike, fix: str = "run hc-retrofit convert first") -> None:
    """Refuse ``path`` unless it is a converted checkpoint: :class:`CheckpointError` if it is no checkpoint
    at all, else :class:`NotConvertedError` ending with ``fix``."""
    if not isinstance(read_config_dict(path).get(CONFIG_KEY), dict):
        raise NotConvertedError(f"{path} is not a converted hc-retrofit checkpoint; {fix}")


# ----------------------------------------------------------------------------- safetensors headers
@dataclass(frozen=True)
class SafetensorsHeader:
    """A safetensors file's header: tensor entries (``dtype``, ``shape``, ``data_offsets``), metadata,
    and the byte offset where the tensor data starts."""

    tensors: dict[str, dict[str, Any]]
    metadata: dict[str, str] | None
    data_start: int


def read_header(path: str | os.PathLike) -> SafetensorsHeader:
    """The header of safetensors file ``path``, read and checked without reading any tensor.

    A file that is not safetensors, has a damaged header, or is shorter than its header says is a
    :class:`CheckpointError` naming it: a damaged file would otherwise surface as a
    ``SafetensorError`` or a ``MemoryError`` (a garbage header length) deep inside a loader.
    """
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if length < 2 or length > size - 8:
            raise CheckpointError(
                f"{path} is not a safetensors file or is truncated (bad header); download or copy the checkpoint again"
            )
        try:
            header = json.loads(f.read(length))
            metadata = header.pop("__metadata__", None)
            end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
            raise CheckpointError(f"{path} has a damaged header; download or copy the checkpoint again") from err
    if 8 + length + end > size:
        raise CheckpointError(
            f"{path} is truncated ({size:,} bytes, its header needs {8 + length + end:,}); download or copy the "
            "checkpoint again"
        )
    return SafetensorsHeader(header, metadata, 8 + length)


def check_weight_files(directory: str | os.PathLike) -> None:
    """Fail with one line on a truncated or garbage ``*.safetensors`` file in ``directory`` (headers only),
    or on a shard its index lists that is not there."""
    for index in sorted(Path(directory).glob("*.index.json")):
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise CheckpointError(
                f"{index} is damaged (no weight_map); download or copy the checkpoint again"
            ) from None
        missing = sorted(str(name) for name in shards if not (Path(directory) / str(name)).is_file())
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise CheckpointError(
                f"{directory}: shard {missing[0]}{more} listed in {index.name} is missing; download or copy the "
                "checkpoint again"
            )
    for file in sorted(Path(directory).glob("*.safetensors")):
        read_header(file)
