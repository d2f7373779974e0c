"""Planning a streamed convert: prove, from configs and tensor headers only, that the base's shards
plus one shard of HC tensors are the checkpoint the in-memory convert would write.

The HC tensors come from :func:`hc_retrofit.modeling.patch.apply_family` itself: the base model is
built on the meta device (no storage), converted as in memory, and each of its HC sites is
instantiated on the CPU from the arguments ``apply_family()`` gave it (the same constructor, so the
same values). A checkpoint that cannot be streamed raises :class:`CannotStream` with the reason: it
must be safetensors, of a known family built by transformers itself, and its tensors must be
exactly the model's (names, shapes; tied weights may be absent), so that loading needs no
renaming, conversion or dropping.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hc_retrofit.base_model import load_base_config
from hc_retrofit.checkpoint_format import check_weight_files, read_header, torch_dtype
from hc_retrofit.connections import HyperConnection
from hc_retrofit.dtypes import parse_dtype
from hc_retrofit.modeling.config import HCConfig
from hc_retrofit.modeling.families import FAMILIES
from hc_retrofit.modeling.patch import apply_family
from hc_retrofit.shard_copy import NoShards, base_shards

DOWNLOAD_PATTERNS = ["*.safetensors", "*.json", "*.model", "*.txt", "*.tiktoken", "*.py"]


class CannotStream(Exception):
    """Why this checkpoint cannot be streamed (the caller converts in memory instead)."""


@dataclass
class Shard:
    """One base safetensors file and what to do with it."""

    source: Path
    name: str  # file name in the output
    tensors: dict[str, dict[str, Any]]  # header entries (dtype, shape, data_offsets)
    metadata: dict[str, str] | None
    cast: dict[str, torch.dtype] = field(default_factory=dict)  # tensors to re-encode, and to what


@dataclass
class StreamPlan:
    """A proven-equivalent streaming conversion, ready to write."""

    source: str  # what the user passed
    local_dir: Path
    base_config: Any
    model: Any  # the converted model on the meta device
    dtype: torch.dtype
    shards: list[Shard]
    hc_tensors: dict[str, torch.Tensor]
    revision: str | None = None
    trust_remote_code: bool = False


def _local_dir(source: str, revision: str | None, progress: Callable[[str], None]) -> Path:
    local = Path(source).expanduser()
    if local.is_dir():
        return local
    from huggingface_hub import snapshot_download

    progress(f"downloading {source} from the Hugging Face Hub")
    try:
        return Path(snapshot_download(source, revision=revision, allow_patterns=DOWNLOAD_PATTERNS))
    except Exception as err:  # offline, gated ...: the in-memory path reports it properly
        detail = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CannotStream(f"could not download its files ({detail})") from err


def _base_shards(local: Path) -> list[tuple[Path, str]]:
    """``(file, output name)`` of every weight shard, from the index or the single file."""
    check_weight_files(local)  # a damaged shard is the user's to fix, not a reason to fall back
    try:
        return base_shards(local)
    except NoShards as why:
        raise CannotStream(str(why)) from why


def _meta_model(base_config: Any, dtype: torch.dtype, config: HCConfig) -> Any:
    from transformers import AutoModelForCausalLM

    if getattr(base_config, "auto_map", None):
        raise CannotStream("it uses its own modeling code (auto_map)")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(base_config, dtype=dtype)
    if not type(model).__module__.startswith("transformers."):
        raise CannotStream(f"{type(model).__name__} is not a transformers class")
    if dtype in (torch.float16, torch.bfloat16) and (
        getattr(model, "_keep_in_fp32_modules", None) or getattr(model, "_keep_in_fp32_modules_strict", None)
    ):
        raise CannotStream(f"{type(model).__name__} keeps some modules in float32")
    apply_family(model, config)  # unchecked here: the written files are proven by verify
    return model


def hc_tensors(model: Any) -> dict[str, torch.Tensor]:
    """The HC parameters of converted (meta) ``model``, materialised on the CPU with their initial values.

    Each site is rebuilt with the arguments :func:`convert` gave it (``HyperConnection(dim, config,
    site_index)``), so the values are what the in-memory conversion holds.
    """
    out: dict[str, torch.Tensor] = {}
    for prefix, site in model.named_modules():
        if not isinstance(site, HyperConnection):
            continue
        fresh = HyperConnection(site.dim, site.config, site.site_index)
        for name, meta in site.state_dict().items():
            value = fresh.state_dict()[name]
            if value.shape != meta.shape or value.dtype != meta.dtype:
                raise RuntimeError(f"{prefix}.{name}: rebuilt {value.shape}/{value.dtype} != {meta.shape}/{meta.dtype}")
            out[f"{prefix}.{name}"] = value.detach().clone()
    return out


def _target_dtype(requested: str | torch.dtype, base_config: Any, first: dict[str, Any] | None) -> torch.dtype:
    """The dtype ``from_pretrained(dtype=requested)`` gives the weights (its rule for ``"auto"``)."""
    if isinstance(requested, torch.dtype):
        return requested
    configured = getattr(base_config, "dtype", None)
    if isinstance(configured, str):
        configured = getattr(torch, configured, None)
    if isinstance(configured, torch.dtype):
        return configured
    if first is not None:
        for entry in first.values():
            dtype = torch_dtype(entry["dtype"])
            if dtype is not None and dtype.is_floating_point:
                return dtype
    return torch.get_default_dtype()


def plan_streaming(
    model_id_or_dir: str,
    config: HCConfig,
    *,
    revision: str | None = None,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    progress: Callable[[str], None] | None = None,
) -> StreamPlan:
    """Check that ``model_id_or_dir`` can be streamed and plan it, reading only configs and headers.

    Raises the usual :class:`~hc_retrofit.modeling.errors.HCRetrofitError` for bad input (unknown model,
    unsupported or converted architecture), and :class:`CannotStream` (with the reason) when only
    the in-memory conversion can do it.
    """
    say = progress or (lambda _msg: None)
    requested = parse_dtype(dtype)
    base_config = load_base_config(model_id_or_dir, revision=revision, trust_remote_code=trust_remote_code)
    if base_config.model_type not in FAMILIES:  # discovery and its proof need the weights
        raise CannotStream(f"{base_config.model_type!r} has no hand-written adapter; it is discovered in memory")
    if getattr(base_config, "transformers_weights", None):
        raise CannotStream("its config names its own weights file")
    local = _local_dir(model_id_or_dir, revision, say)
    files = _base_shards(local)
    headers = [(path, name, (h := read_header(path)).tensors, h.metadata) for path, name in files]
    target = _target_dtype(requested, base_config, headers[0][2] if headers else None)
    model = _meta_model(base_config, target, config)
    hc = hc_tensors(model)
    # What the model expects: every state_dict key; a tied parameter needs only one of its names.
    expected = {k: v for k, v in model.state_dict(keep_vars=True).items() if k not in hc}
    groups: dict[int, list[str]] = {}
    for name, tensor in expected.items():
        groups.setdefault(id(tensor), []).append(name)
    present: dict[str, str] = {}
    shards = []
    for path, name, entries, metadata in headers:
        shard = Shard(path, name, entries, metadata)
        for key, entry in entries.items():
            if key in present:
                raise CannotStream(f"tensor {key} is stored twice ({present[key]} and {path.name})")
            present[key] = path.name
            if key not in expected:
                raise CannotStream(f"its tensor {key} is not a parameter of {type(model).__name__}")
            want = expected[key]
            stored = torch_dtype(entry.get("dtype"))
            if stored is None:
                raise CannotStream(f"tensor {key} has dtype {entry.get('dtype')}")
            if list(entry["shape"]) != list(want.shape):
                raise CannotStream(f"tensor {key} has shape {entry['shape']}, the model {list(want.shape)}")
            if stored != want.dtype and (stored.is_floating_point and want.dtype.is_floating_point):
                shard.cast[key] = want.dtype
            elif stored != want.dtype:
                raise CannotStream(f"tensor {key} is {stored}, the model {want.dtype}")
        shards.append(shard)
    for names in groups.values():
        if not any(n in present for n in names):
            raise CannotStream(f"it lacks {names[0]}")
    return StreamPlan(model_id_or_dir, local, base_config, model, target, shards, hc, revision, trust_remote_code)
