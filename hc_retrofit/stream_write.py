"""Writing a streamed convert's plan: the base shards copied (or linked) in the background, the HC
shard, the index, config, tokenizer and remote code beside them, all in a staging directory that
replaces the output only once complete (and checked). :func:`write_safetensors` writes a
safetensors file one tensor at a time (the shards re-encoded to another dtype).
"""

from __future__ import annotations

import json
import os
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from hc_retrofit import outputs
from hc_retrofit.base_model import load_tokenizer
from hc_retrofit.checkpoint_format import HC_SHARD, INDEX_FILE, st_name, torch_dtype
from hc_retrofit.saving import check_output_dir, write_converted_files
from hc_retrofit.shard_copy import EarlyCopy, ShardCopier
from hc_retrofit.stream_plan import Shard, StreamPlan


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


def _reencode(shard: Shard, dst: Path) -> None:
    from safetensors import safe_open

    dst.unlink(missing_ok=True)  # never write through a hard link (an early copy may have linked the base shard)
    specs = {k: (shard.cast.get(k, torch_dtype(e["dtype"])), list(e["shape"])) for k, e in shard.tensors.items()}
    names = sorted(shard.tensors, key=lambda k: shard.tensors[k]["data_offsets"][0])
    with safe_open(str(shard.source.resolve()), framework="pt") as f:
        write_safetensors(dst, names, f.get_tensor, specs, shard.metadata or {"format": "pt"})


def say_copying(copier: ShardCopier, say: Callable[[str], None]) -> None:
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
                say_copying(copier, say)
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
