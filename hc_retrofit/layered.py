"""Run a checkpoint's model with its decoder layers loaded one at a time: inference beyond RAM.

``verify`` of a model larger than the free memory cannot hold it (let alone it and its base, in
float32). But a forward pass needs one decoder layer at a time. So the model is built with every
parameter on the meta device (non-persistent buffers, e.g. rotary frequencies, computed as
``from_pretrained`` computes them), the parameters outside the decoder layers (embeddings, final norm, head) are loaded once, and each
decoder layer's tensors are read from the safetensors files when the layer is called and dropped
when it returns (hooks on the layer). Peak memory: the non-layer parameters plus one layer.

Everything else is the model's own code (masks, rotary, KV cache, ``generate()``), with the same
float32 weights as an in-memory load, so the outputs are the same numbers, bit for bit.

Tensors are read with plain file reads at the offsets of the safetensors header (no ``mmap``:
mapped pages would stay counted in the process's memory after the layer is dropped).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from hc_retrofit.checkpoint_format import INDEX_FILE, SINGLE_FILE, check_weight_files, read_header, torch_dtype
from hc_retrofit.modeling.errors import CheckpointError


class LayeredUnavailable(Exception):
    """Why a checkpoint cannot be run layer by layer (its tensors are not exactly the model's)."""


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation, or ``None`` if unknown.

    The system's ``MemAvailable``, capped by the cgroup's room (a container's memory limit minus
    its working set, i.e. usage less the reclaimable file cache, as the kubelet counts it):
    inside a container ``/proc/meminfo`` describes the host, and trusting it would get us killed.
    """
    system = _system_available()
    room = _cgroup_room()
    if system is None or room is None:
        return system if room is None else room
    return min(system, room)


def _system_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    with contextlib.suppress(ImportError):  # psutil is a [bench] extra, not a core dependency
        import psutil

        return int(psutil.virtual_memory().available)
    with contextlib.suppress(ValueError, OSError, AttributeError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return None


CGROUPS = (  # (limit, usage, stat file, its reclaimable-cache key): cgroup v2, then v1
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory.stat", "inactive_file"),
    (
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
        "/sys/fs/cgroup/memory/memory.usage_in_bytes",
        "/sys/fs/cgroup/memory/memory.stat",
        "total_inactive_file",
    ),
)


def _cgroup_room(root: str = "") -> int | None:
    """The cgroup's memory limit minus its working set, or ``None`` if there is no (readable) limit."""
    for limit_file, usage_file, stat_file, cache_key in CGROUPS:
        try:
            limit_text = Path(root + limit_file).read_text().strip()
            usage = int(Path(root + usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if not limit_text.isdigit() or int(limit_text) >= 2**60:  # "max", or v1's "no limit" (~2^63)
            return None
        cache = 0
        with contextlib.suppress(OSError, ValueError):
            for line in Path(root + stat_file).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == cache_key:
                    cache = int(value)
        return max(0, int(limit_text) - max(0, usage - cache))
    return None


# ----------------------------------------------------------------------------- safetensors files
@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor lives: file, byte offset and length, dtype and shape."""

    path: Path
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    def read(self) -> torch.Tensor:
        """The tensor, read from its file into fresh memory."""
        buffer = torch.empty(self.nbytes, dtype=torch.uint8)
        self._read_bytes(buffer)
        return buffer.view(self.dtype).reshape(self.shape)

    @torch.no_grad()
    def read_into(self, target: torch.Tensor) -> None:
        """Set ``target`` (same shape) to the stored tensor.

        A contiguous CPU target of the stored dtype is updated block by block: each block of the
        file is read into a small buffer and written into ``target`` only where it differs. The
        result is the same as a copy, but a target that already holds these bytes (a base model
        whose weights are the checkpoint's base shards, possibly memory-mapped) is only read: no
        second copy of the model, no copy-on-write of mapped pages. Any other target: read, then
        copied and converted.
        """
        if tuple(target.shape) != self.shape:
            raise ValueError(
                f"{self.path}: the stored tensor has shape {list(self.shape)}, the target {list(target.shape)}"
            )
        if target.dtype == self.dtype and target.device.type == "cpu" and target.is_contiguous():
            self._update_bytes(target.detach().reshape(-1).view(torch.uint8))
        else:
            target.copy_(self.read())

    def _update_bytes(self, dest: torch.Tensor) -> None:
        """Make the CPU uint8 tensor ``dest`` (``nbytes`` long) hold the stored bytes, writing only the
        blocks that differ."""
        if not self.nbytes:
            return
        buffer = torch.empty(min(READ_BLOCK, self.nbytes), dtype=torch.uint8)
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.offset)
            for start in range(0, self.nbytes, READ_BLOCK):
                block = buffer[: min(READ_BLOCK, self.nbytes - start)]
                self._fill(f, block)
                part = dest[start : start + block.numel()]
                if not _same_bytes(part, block):
                    part.copy_(block)

    def _read_bytes(self, buffer: torch.Tensor) -> None:
        """Fill the contiguous CPU uint8 ``buffer`` (``nbytes`` long) with the tensor's bytes."""
        if self.nbytes:
            with open(self.path, "rb", buffering=0) as f:
                f.seek(self.offset)
                self._fill(f, buffer)

    def _fill(self, f: Any, buffer: torch.Tensor) -> None:
        """Fill ``buffer`` with the next bytes of open file ``f`` (a truncated file is a one-line error)."""
        view = memoryview(buffer.numpy())
        done = 0
        while done < len(view):
            got = f.readinto(view[done:])
            if not got:
                raise CheckpointError(f"{self.path} is truncated; download or copy the checkpoint again")
            done += got


READ_BLOCK = 2**20
"""Bytes per block of :meth:`StoredTensor.read_into` (its buffer stays in the CPU's cache)."""


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two uint8 tensors of one length hold the same bytes (compared 8 at a time where aligned)."""
    if a.numel() % 8 == 0 and a.storage_offset() % 8 == 0 and b.storage_offset() % 8 == 0:
        return torch.equal(a.view(torch.int64), b.view(torch.int64))  # bitwise: integers, not floats (NaN, -0.0)
    return torch.equal(a, b)


def stored_tensors(directory: str | os.PathLike) -> dict[str, StoredTensor]:
    """Every tensor of the safetensors checkpoint in ``directory`` (from its index, or its single file).

    A damaged or truncated file is a :class:`CheckpointError` naming it (checked from the headers first).
    """
    directory = Path(directory)
    check_weight_files(directory)
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise CheckpointError(f"{index} is unreadable; download or copy the checkpoint again") from err
    elif (directory / SINGLE_FILE).is_file():
        files = [SINGLE_FILE]
    else:
        raise LayeredUnavailable(f"{directory} has no safetensors weights")
    out: dict[str, StoredTensor] = {}
    for name in files:
        path = (directory / name).resolve()
        if not path.is_file():
            raise CheckpointError(f"{directory / name} is missing; download or copy the checkpoint again")
        header = read_header(path)
        for key, entry in header.tensors.items():
            dtype = torch_dtype(entry.get("dtype"))
            if dtype is None:
                raise LayeredUnavailable(f"tensor {key} has dtype {entry.get('dtype')}")
            begin, end = entry["data_offsets"]
            out[key] = StoredTensor(path, header.data_start + begin, end - begin, dtype, tuple(entry["shape"]))
    return out


# ----------------------------------------------------------------------------- the model
Model = TypeVar("Model", bound=nn.Module)


def build_weightless(build: Callable[[], Model]) -> Model:
    """``build()`` with every parameter and persistent buffer on the meta device (no storage).

    The model is built under ``torch.device("meta")``, a torch-function mode that applies to the
    calling thread only (another thread, e.g. a shard copy, keeps building real tensors), so even a
    70B model costs no memory and no random-init time. Its non-persistent buffers (e.g. rotary
    frequencies), which no checkpoint holds, are then given their values as ``from_pretrained``
    gives them after its own meta-device build: real placeholders filled by the model's public
    ``initialize_weights()`` (which leaves the meta parameters without storage).
    """
    with torch.device("meta"):
        model = build()
    persistent = set(model.state_dict())
    for name, buffer in list(model.named_buffers()):
        if buffer.is_meta and name not in persistent:
            owner, leaf = _slot(model, name)
            owner.register_buffer(leaf, torch.empty_like(buffer, device="cpu"), persistent=False)
    initialize = getattr(model, "initialize_weights", None)
    if callable(initialize):
        initialize()
    return model


def _slot(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    owner, _, leaf = name.rpartition(".")
    return (model.get_submodule(owner) if owner else model), leaf


def _tensor(module: nn.Module, leaf: str) -> tuple[torch.Tensor | None, bool]:
    """``module``'s own parameter or buffer ``leaf``, and whether it is a parameter."""
    parameters = dict(module.named_parameters(recurse=False, remove_duplicate=False))
    if leaf in parameters:
        return parameters[leaf], True
    return dict(module.named_buffers(recurse=False, remove_duplicate=False)).get(leaf), False


def _put(module: nn.Module, leaf: str, value: Any, is_parameter: bool) -> None:
    """Set ``module``'s parameter or (persistent: a checkpoint's) buffer ``leaf`` to ``value``."""
    if is_parameter:
        module.register_parameter(leaf, value)
    else:
        module.register_buffer(leaf, value)


class LayerLoader:
    """Loads ``model``'s non-layer tensors now and each decoder layer's around its call.

    ``model``: built by :func:`build_weightless`; ``layers``: its decoder-layer list;
    ``cast(name, stored)``: the tensor the model must hold for checkpoint tensor ``stored``
    (e.g. ``stored.float()``). Every parameter (and persistent buffer) of the model must be in
    ``tensors`` under its own name with its shape (a tied parameter under one of its names), and
    every tensor must be the model's: else :class:`LayeredUnavailable` (``strict``: a
    :class:`CheckpointError`, for checkpoints that must match their model exactly).
    """

    def __init__(
        self,
        model: nn.Module,
        layers: nn.ModuleList,
        tensors: dict[str, StoredTensor],
        cast: Callable[[str, torch.Tensor], torch.Tensor],
        *,
        source: str = "the checkpoint",
        strict: bool = False,
    ) -> None:
        self.model, self.layers, self.tensors, self.cast = model, layers, tensors, cast
        self.loaded_bytes = 0  # largest amount of layer tensors held at once
        self._held = 0
        self._hooks: list[Any] = []
        expected = model.state_dict(keep_vars=True)
        groups: dict[int, list[str]] = {}
        for name, tensor in expected.items():
            groups.setdefault(id(tensor), []).append(name)
        fail = CheckpointError if strict else LayeredUnavailable
        problems = [f"unexpected tensor {k}" for k in tensors if k not in expected]
        self._source: dict[str, str] = {}  # model name -> checkpoint name
        for names in groups.values():
            stored = next((n for n in names if n in tensors), None)
            if stored is None:
                problems.append(f"missing tensor {names[0]}")
                continue
            if tuple(expected[names[0]].shape) != tensors[stored].shape:
                problems.append(
                    f"tensor {stored} has shape {list(tensors[stored].shape)}, the model {list(expected[names[0]].shape)}"
                )
            for name in names:
                self._source[name] = stored
        if problems:
            more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
            raise fail(f"{source} does not match the model it describes: {'; '.join(problems[:3])}{more}")
        prefix = next(name for name, module in model.named_modules() if module is layers)
        self._layer_names: list[list[str]] = [[] for _ in layers]
        resident = []
        for name in expected:
            index = name[len(prefix) + 1 :].partition(".")[0] if name.startswith(prefix + ".") else ""
            if index.isdigit():
                self._layer_names[int(index)].append(name)
            else:
                resident.append(name)
        self._place(resident)
        for index, layer in enumerate(layers):
            self._hooks.append(layer.register_forward_pre_hook(self._loader(index)))
            self._hooks.append(layer.register_forward_hook(self._unloader(index)))

    def _place(self, names: list[str]) -> dict[str, Any]:
        """Put the checkpoint values of ``names`` into the model; return what was there before."""
        before: dict[str, Any] = {}
        values: dict[str, torch.Tensor] = {}
        for name in names:
            module, leaf = _slot(self.model, name)
            current, is_parameter = _tensor(module, leaf)
            if current is not None and current.device.type != "meta" and is_parameter:
                continue  # tied to a tensor loaded already
            stored = self._source[name]
            if stored not in values:
                values[stored] = self.cast(stored, self.tensors[stored].read())
            value = values[stored]
            before[name] = current
            _put(module, leaf, nn.Parameter(value, requires_grad=False) if is_parameter else value, is_parameter)
        self._held += sum(v.numel() * v.element_size() for v in values.values())
        self.loaded_bytes = max(self.loaded_bytes, self._held)
        return before

    def _loader(self, index: int) -> Callable[..., None]:
        def load(module: nn.Module, args: Any) -> None:
            self._restore = self._place(self._layer_names[index])

        return load

    def _unloader(self, index: int) -> Callable[..., None]:
        def unload(module: nn.Module, args: Any, output: Any) -> None:
            freed: set[int] = set()
            for name, previous in self._restore.items():
                owner, leaf = _slot(self.model, name)
                value, is_parameter = _tensor(owner, leaf)
                if value is not None and id(value.untyped_storage()) not in freed:
                    freed.add(id(value.untyped_storage()))
                    self._held -= value.numel() * value.element_size()
                _put(owner, leaf, previous, is_parameter)
            for sub in module.modules():  # caches derived from the dropped tensors (hc sites)
                clear = getattr(sub, "clear_cache", None)
                if callable(clear):
                    clear()
            self._restore = {}

        return unload

    def close(self) -> None:
        """Remove the hooks (the model keeps its non-layer tensors until it is dropped)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
