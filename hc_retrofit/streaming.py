"""Streaming convert: a converted checkpoint written without loading the base model's weights.

A conversion changes no base tensor (names and values stay), and the HC tensors depend only on
the config. So the converted directory is the base safetensors shards, unchanged (copied, or hard
linked with ``link=True``; re-encoded tensor by tensor only when the dtype changes), plus one
shard of HC tensors, an index, the converted config, tokenizer, generation config and remote code.
Memory stays at one tensor (re-encoding) or nothing (copying), whatever the model size.

The HC tensors come from :func:`hc_retrofit.modeling.patch.apply_family` itself: the base model is built on the
meta device (no storage), converted as in memory, and each of its HC sites is instantiated on the
CPU from the arguments ``apply_family()`` gave it (the same constructor, so the same values).

:func:`plan_streaming` first proves the output equivalent to the in-memory conversion, or says
why it cannot (the caller then converts in memory): the checkpoint must be safetensors, of a
known family built by transformers itself, and its tensors must be exactly the model's (names,
shapes; tied weights may be absent), so that loading needs no renaming, conversion or dropping.
"""

from __future__ import annotations

import json
import math
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hc_retrofit import outputs
from hc_retrofit.base_model import load_base_config, load_tokenizer
from hc_retrofit.checkpoint_format import HC_SHARD, INDEX_FILE, check_weight_files, read_header, st_name, torch_dtype
from hc_retrofit.connections import HyperConnection
from hc_retrofit.conversion import ConvertSummary, count_parameters
from hc_retrofit.dtypes import parse_dtype
from hc_retrofit.modeling.config import HCConfig
from hc_retrofit.modeling.errors import HCRetrofitError
from hc_retrofit.modeling.families import FAMILIES, family_for
from hc_retrofit.modeling.patch import apply_family, decoder_layers, hyper_connection_sites
from hc_retrofit.saving import check_output_dir, write_converted_files
from hc_retrofit.shard_copy import (
    EarlyCopy,
    NoShards,
    ShardCopier,
    base_shards,
    start_copy,
)

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


# ----------------------------------------------------------------------------- safetensors files
def write_safetensors(
    path: Path,
    names: list[str],
    get: Callable[[str], torch.Tensor],
    specs: dict[str, tuple[torch.dtype, list[int]]],
    metadata: dict[str, str] | None,
) -> None:
    """Write a safetensors file tensor by tensor: ``get(name)`` is called once per tensor, in order.

    The header is computed from ``specs`` (dtype, shape) first, so only one tensor is in memory at a time.
    """
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for name in names:
        dtype, shape = specs[name]
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": st_name(dtype), "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name in names:
            dtype, shape = specs[name]
            tensor = get(name).to(dtype).contiguous()
            if list(tensor.shape) != list(shape):
                raise RuntimeError(f"{name}: shape {list(tensor.shape)} is not the planned {list(shape)}")
            if tensor.numel():
                f.write(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())


# ----------------------------------------------------------------------------- planning
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


# ----------------------------------------------------------------------------- writing
def _reencode(shard: Shard, dst: Path) -> None:
    from safetensors import safe_open

    dst.unlink(missing_ok=True)  # never write through a hard link (an early copy may have linked the base shard)
    specs = {k: (shard.cast.get(k, torch_dtype(e["dtype"])), list(e["shape"])) for k, e in shard.tensors.items()}
    names = sorted(shard.tensors, key=lambda k: shard.tensors[k]["data_offsets"][0])
    with safe_open(str(shard.source.resolve()), framework="pt") as f:
        write_safetensors(dst, names, f.get_tensor, specs, shard.metadata or {"format": "pt"})


def _say_copying(copier: ShardCopier, say: Callable[[str], None]) -> None:
    if copier.files:
        n = len(copier.files)
        say(f"{'linking' if copier.link else 'copying'} {n} base shard{'s' if n != 1 else ''} in the background")


def write_plan(
    plan: StreamPlan,
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    link: bool = False,
    check: Callable[[Path], None] | None = None,
    progress: Callable[[str], None] | None = None,
    early: EarlyCopy | None = None,
    timings: dict[str, float] | None = None,
) -> tuple[Path, int]:
    """Write ``plan`` to ``out_dir`` atomically (beside it as ``.partial``, renamed at the end).

    The base shards are copied (or linked) in a background thread while the HC shard and the
    small files are written; ``early``: a copy started before planning (:func:`start_copy`),
    into the staging directory this then completes. ``check(tmp_dir)`` runs on the finished
    directory before the rename (e.g. verify): if it raises, nothing is left behind. Returns the
    output path and how many shards were hard linked. ``timings`` receives seconds per phase.
    """

    say = progress or (lambda _msg: None)
    timings = timings if timings is not None else {}
    names = [shard.name for shard in plan.shards]
    if early is not None:
        out, tmp, copier = early.out, early.staging, early.copier
        if [name for _, name in copier.files] != names:  # both come from base_shards(): a bug if not
            early.abort()
            raise RuntimeError(f"the early copy has shards {[n for _, n in copier.files]}, the plan {names}")
    else:
        out = check_output_dir(Path(out_dir), overwrite=overwrite, source=str(plan.local_dir))
        tmp = outputs.staging_dir(out)
        copier = ShardCopier([(s.source, s.name) for s in plan.shards if not s.cast], tmp, link=link).start()
    hashed: dict[str, dict] = {}  # the copied shards' hashes, for the manifest (see shard_copy)
    with outputs.staged(out, kind="checkpoint", tmp=tmp, hashed=hashed):
        try:
            if early is None:
                _say_copying(copier, say)
            started = time.perf_counter()
            _write_files(plan, tmp)
            timings["files"] = time.perf_counter() - started
            started = time.perf_counter()
            cast = {s.name for s in plan.shards if s.cast}  # re-encoded below: not what the copier hashed
            linked = copier.wait()
            hashed.update({name: record for name, record in copier.hashed.items() if name not in cast})
            timings["copy wait"] = time.perf_counter() - started
            timings["copy"] = copier.seconds
            for note in copier.notes:
                say(note)
            for i, shard in enumerate([s for s in plan.shards if s.cast], 1):
                say(f"re-encoding {shard.source.name} to {plan.dtype} ({i}/{sum(1 for s in plan.shards if s.cast)})")
                _reencode(shard, tmp / shard.name)
            if check is not None:
                started = time.perf_counter()
                check(tmp)
                timings["checks"] = time.perf_counter() - started
        except BaseException:  # stop the copy before the staging directory is removed
            copier.cancel()
            raise
    return out, sum(1 for name in linked if name not in cast)


def _write_files(plan: StreamPlan, tmp: Path) -> None:
    """Everything but the base shards: the HC shard, the index, the configs, tokenizer and remote code."""
    from safetensors.torch import save_file

    weight_map: dict[str, str] = {}
    total = 0
    for shard in plan.shards:
        for key, entry in shard.tensors.items():
            weight_map[key] = shard.name
            dtype = shard.cast.get(key, torch_dtype(entry["dtype"]))
            total += torch.Size(entry["shape"]).numel() * torch.empty((), dtype=dtype).element_size()
    save_file(plan.hc_tensors, str(tmp / HC_SHARD), metadata={"format": "pt"})
    for key, tensor in plan.hc_tensors.items():
        weight_map[key] = HC_SHARD
        total += tensor.numel() * tensor.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    model = plan.model
    model.config.save_pretrained(tmp)
    generation = _generation_config(plan)
    if generation is not None:
        generation.save_pretrained(tmp)
    # as the in-memory path loads it (by the name the user gave: tokenizer_config records is_local)
    tokenizer = load_tokenizer(plan.source, revision=plan.revision, trust_remote_code=plan.trust_remote_code)
    base = str(plan.local_dir.resolve()) if Path(plan.source).expanduser().is_dir() else plan.source
    write_converted_files(tmp, model, tokenizer, base=base)


def _generation_config(plan: StreamPlan) -> Any:
    """What ``from_pretrained`` + ``save_pretrained`` would write: the base's file, else one from the config."""
    from transformers import GenerationConfig

    if not plan.model.can_generate():
        return None
    if (plan.local_dir / "generation_config.json").is_file():
        return GenerationConfig.from_pretrained(plan.local_dir)
    return plan.model.generation_config


@dataclass(frozen=True)
class StreamSummary(ConvertSummary):
    """:class:`ConvertSummary` of a streamed conversion, with how the shards were written and checked."""

    shards: int = 0
    linked_shards: int = 0
    reencoded_shards: int = 0
    verified: bool = False
    verify_loading: str | None = None  # how verify ran: "in memory" or "layer by layer" (larger than memory)
    timings: dict[str, float] = field(
        default_factory=dict
    )  # seconds: plan, files (HC shard, config, tokenizer, code), copy, copy wait, checks, verify


def stream_convert(
    model_id_or_dir: str,
    out_dir: str | os.PathLike,
    config: HCConfig,
    *,
    revision: str | None = None,
    dtype: str = "auto",
    overwrite: bool = False,
    trust_remote_code: bool = False,
    link: bool = False,
    verify: bool = False,
    check: Callable[[Path], None] | None = None,
    progress: Callable[[str], None] | None = None,
    early: EarlyCopy | None = None,
) -> StreamSummary:
    """Convert ``model_id_or_dir`` to ``out_dir`` without loading its weights (see the module docstring).

    ``verify``: run :func:`verify_streamed` on the result before moving it into place: one
    model in float32 in memory when it fits, else layer by layer (:mod:`hc_retrofit.layered`;
    said through ``progress`` and in the summary). ``check(dir)``: any other check at that point.
    The shards of a local checkpoint are copied in the background from the start (with ``dtype``
    ``auto``; ``early``: a copy the caller started, see :func:`start_copy`), while it plans.
    Raises :class:`CannotStream` when only :func:`convert_checkpoint` can do it (nothing left behind).
    The lock of ``out_dir`` is held throughout (a second writer is refused).
    """
    target = check_output_dir(Path(out_dir), overwrite=overwrite, source=model_id_or_dir)
    with outputs.output_lock(target):
        return _stream_convert(
            model_id_or_dir,
            out_dir,
            config,
            revision=revision,
            dtype=dtype,
            overwrite=overwrite,
            trust_remote_code=trust_remote_code,
            link=link,
            verify=verify,
            check=check,
            progress=progress,
            early=early,
        )


def _stream_convert(
    model_id_or_dir: str,
    out_dir: str | os.PathLike,
    config: HCConfig,
    *,
    revision: str | None,
    dtype: str,
    overwrite: bool,
    trust_remote_code: bool,
    link: bool,
    verify: bool,
    check: Callable[[Path], None] | None,
    progress: Callable[[str], None] | None,
    early: EarlyCopy | None,
) -> StreamSummary:
    """:func:`stream_convert` while holding the output's lock."""
    say = progress or (lambda _msg: None)
    start = time.perf_counter()
    parse_dtype(dtype)
    if early is None and dtype == "auto":  # a dtype change re-encodes, most likely every shard: no early copy
        early = start_copy(model_id_or_dir, out_dir, overwrite=overwrite, link=link)
    if early is None:
        check_output_dir(Path(out_dir), overwrite=overwrite, source=model_id_or_dir)
    else:
        _say_copying(early.copier, say)
    timings: dict[str, float] = {}
    try:
        say(f"reading the config and tensor headers of {model_id_or_dir}")
        plan = plan_streaming(
            model_id_or_dir, config, revision=revision, dtype=dtype, trust_remote_code=trust_remote_code, progress=say
        )
        timings["plan"] = time.perf_counter() - start
    except BaseException:
        if early is not None:
            early.abort()
        raise
    loading: list[str] = []

    def run_checks(directory: Path) -> None:
        if check is not None:
            check(directory)
        if verify:
            started = time.perf_counter()
            loading.append(verify_streamed(directory, plan.dtype, progress=say))
            timings["verify"] = time.perf_counter() - started

    out, linked = write_plan(
        plan,
        out_dir,
        overwrite=overwrite,
        link=link,
        check=run_checks,
        progress=say,
        early=early,
        timings=timings,
    )
    model = plan.model
    family = family_for(plan.base_config)
    added = sum(t.numel() for t in plan.hc_tensors.values())
    local = Path(model_id_or_dir).expanduser()
    return StreamSummary(
        base_model=str(local.resolve()) if local.is_dir() else str(model_id_or_dir),
        out_dir=str(out),
        model_type=plan.base_config.model_type,
        block_kind=family.block_for(plan.base_config).kind,
        layers=len(decoder_layers(model, family)),
        sites=len(hyper_connection_sites(model)),
        num_streams=config.num_streams,
        variant=config.variant,
        base_parameters=count_parameters(model) - added,
        added_parameters=added,
        has_tokenizer=(out / "tokenizer_config.json").is_file() or (out / "tokenizer.json").is_file(),
        seconds=time.perf_counter() - start,
        shards=len(plan.shards),
        linked_shards=linked,
        reencoded_shards=sum(1 for shard in plan.shards if shard.cast),
        verified=bool(loading),
        verify_loading=loading[0] if loading else None,
        timings=timings,
    )


class NotEquivalentError(HCRetrofitError):
    """A streamed checkpoint failed verification (a bug: nothing was written)."""


def verify_streamed(directory: Path, dtype: torch.dtype, progress: Callable[[str], None] | None = None) -> str:
    """Run ``verify`` on a streamed checkpoint (before it is moved into place); refuse it unless exact.

    The base is loaded in the checkpoint's ``dtype``: a conversion to bfloat16 must compute what
    the base computes in bfloat16. One model in memory when it fits, else layer by layer.
    Returns how they were loaded (``"in memory"`` or ``"layer by layer"``).
    """
    from hc_retrofit.proof import NEW_TOKENS
    from hc_retrofit.verify import LAYERS, choose_mode, verify_checkpoint

    how = choose_mode(directory)
    if progress is not None:
        detail = " (larger than the memory: layer by layer)" if how == LAYERS else ""
        progress(f"verifying: running the base and the converted model on a probe batch{detail}")
    # the probe of the in-memory convert's proof: the full-sequence logits, then the prefill and one
    # step through the KV cache (``hc-retrofit verify`` continues for longer, to show the agreement)
    report = verify_checkpoint(
        directory, base_dtype=dtype, mode="layers" if how == LAYERS else "memory", new_tokens=NEW_TOKENS
    )
    if not report.equivalent:
        from hc_retrofit.finite_weights import first_nonfinite_in_files, refuse_nonfinite

        if not math.isfinite(report.max_abs_logit_diff):  # NaN logits: a damaged base, not a bug of ours
            refuse_nonfinite(report.base_model, first_nonfinite_in_files(directory))
        raise NotEquivalentError(
            f"the streamed checkpoint is not equivalent to {report.base_model} (max |logit diff| "
            f"{report.max_abs_logit_diff:.2e}, max KL {report.max_kl:.2e}); nothing was written. Convert with "
            "--in-memory, and please report this bug"
        )
    return report.loading
