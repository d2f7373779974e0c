"""Derive an adapter (:class:`~hc_retrofit.modeling.families.Family`) from a loaded model, for any ``model_type``.

1. **The layer stack.** The ``ModuleList`` whose length is the config's number of layers and whose
   classes are in the model's ``_no_split_modules`` (ties: the one the forward actually calls in
   order, each layer once, each with the previous layer's output).
2. **Each layer's residual branches, by probing one forward.** Every direct child of every layer
   records what it read (``args[0]`` / ``hidden_states``) and what it returned (the first tensor).
   Starting from the layer input ``h``, a *site* is found where children read the current stream
   (the entries) and the stream then becomes ``h + y`` for the output ``y`` of one child (a
   sequential, sandwich or post-norm site; the last child giving that ``y`` is the exit, so a dropout
   module after the branch is inside it) or ``h + y1 + y2`` of two children (a parallel site). The
   new stream is what a later child reads, or the layer's output. Which kind a site is follows from
   the modules: an entry that is a norm and an exit that is a norm is ``sandwich``, an entry that is
   not a norm (nor an empty norm slot, ``nn.Identity``) is ``post_norm``, two exits ``parallel``,
   else ``sequential``.
3. **Otherwise the whole layer** is the branch, ``F(h) = layer(h) - h`` (post-LN layers, residual
   adds hidden behind functional dropout, state-space layers with their own caches, ...).

Layers are described one by one, so hybrid stacks (attention and state-space layers) get one block
per layer. Discovery only *proposes*: :func:`hc_retrofit.convert` proves each candidate exact on a
probe batch before keeping it, and refuses when none is.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from hc_retrofit.modeling.errors import UnsupportedArchitectureError
from hc_retrofit.modeling.families import Block, Family, Site

LAYER_COUNT_KEYS = ("num_hidden_layers", "num_layers", "n_layer", "n_layers")


@dataclass
class _Call:
    """One call of a direct child of a layer, in call order."""

    name: str
    input: torch.Tensor | None
    output: torch.Tensor | None


@dataclass
class _LayerRecord:
    calls: int = 0
    order: int = -1
    input: torch.Tensor | None = None
    output: torch.Tensor | None = None
    children: list[_Call] = field(default_factory=list)
    block: Block | None = None


def _num_layers(config: Any) -> int | None:
    for source in (config, config.get_text_config() if hasattr(config, "get_text_config") else config):
        for key in LAYER_COUNT_KEYS:
            value = getattr(source, key, None)
            if isinstance(value, int) and value > 0:
                return value
    return None


def layer_stack_candidates(model: nn.Module) -> list[str]:
    """Dotted paths of ``ModuleList``s that may be the decoder-layer stack, most likely first."""
    n = _num_layers(model.config)
    no_split = set(getattr(model, "_no_split_modules", None) or ())
    scored = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0 or not name:
            continue
        classes = {type(m).__name__ for m in module}
        score = 2 * (len(module) == n) + (bool(no_split) and classes <= no_split)
        if score:
            scored.append((-score, name.count("."), name))
    return [name for *_, name in sorted(scored)]


def _hidden_of(args: tuple, kwargs: dict) -> torch.Tensor | None:
    value = args[0] if args else kwargs.get("hidden_states")
    return value if isinstance(value, torch.Tensor) else None


def _first_tensor(output: Any) -> torch.Tensor | None:
    value = output[0] if isinstance(output, (tuple, list)) and output else output
    return value if isinstance(value, torch.Tensor) else None


def _snapshot(t: torch.Tensor | None) -> torch.Tensor | None:
    # Cloned: layers update outputs in place after the hook (falcon's ``mlp_output += attention_output``).
    return t.detach().float().clone() if t is not None and t.is_floating_point() else None


def _close(a: torch.Tensor | None, b: torch.Tensor | None, rtol: float) -> bool:
    if a is None or b is None or a.shape != b.shape:
        return False
    scale = float(b.abs().max()) + 1e-12
    return bool((a - b).abs().max() <= rtol * scale)


def _is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


def _analyse_layer(layer: nn.Module, record: _LayerRecord, rtol: float) -> Block:
    """The layer's block from what its children read and returned (see the module docstring)."""
    h, out, calls = record.input, record.output, record.children
    if h is None or out is None or h.shape != out.shape:
        return Block("layer")
    names = [c.name for c in calls]
    once = {i for i, name in enumerate(names) if names.count(name) == 1}  # a child called twice ends no site
    sites: list[Site] = []
    kinds: list[str] = []
    stream, pos = h, 0
    while pos < len(calls):
        found = _next_site(calls, once, pos, stream, out, rtol)
        if found is None:
            break
        entries, exits, stream, pos = found
        sites.append(Site(tuple(calls[i].name for i in entries), tuple(calls[j].name for j in exits)))
        kinds.append(_site_kind(layer, sites[-1]))
    if not sites or not _close(stream, out, rtol):
        return Block("layer")
    kind = "parallel" if "parallel" in kinds else next((k for k in kinds if k != "sequential"), "sequential")
    return Block(kind, tuple(sites))


def _site_kind(layer: nn.Module, site: Site) -> str:
    if len(site.exits) > 1:
        return "parallel"
    # an empty pre-norm slot (nn.Identity, e.g. ModernBERT's first layer, whose embeddings are normed) is still one
    entry_norm = all(_is_norm(getattr(layer, n)) or isinstance(getattr(layer, n), nn.Identity) for n in site.entries)
    if not entry_norm:
        return "post_norm"
    return "sandwich" if _is_norm(getattr(layer, site.exits[0])) else "sequential"


def _next_site(
    calls: list[_Call], once: set[int], pos: int, stream: torch.Tensor, out: torch.Tensor, rtol: float
) -> tuple[list[int], list[int], torch.Tensor, int] | None:
    """The first site from call ``pos`` on: (entry indices, exit indices, new stream, next call index).

    Only children called once (``once``) can be entries or exits."""
    readers = [i for i in range(pos, len(calls)) if i in once and _close(calls[i].input, stream, rtol)]
    if not readers:
        return None
    first = readers[0]
    shaped = [
        j
        for j in range(first, len(calls))
        if j in once
        and calls[j].output is not None
        and calls[j].output.shape == stream.shape
        and float(calls[j].output.abs().max()) > rtol * float(stream.abs().max())
    ]

    def target(value: torch.Tensor, after: int) -> int | None:
        """Index of the first later call reading ``value`` (len(calls) for the layer output)."""
        for k in range(after + 1, len(calls)):
            if _close(calls[k].input, value, rtol):
                return k
        return len(calls) if _close(value, out, rtol) else None

    def latest_same(j: int, before: int, taken: set[int]) -> int:
        # A dropout (or any identity) module after the branch: its output is the branch output.
        same = [
            k for k in shaped if j < k < before and k not in taken and _close(calls[k].output, calls[j].output, rtol)
        ]
        return same[-1] if same else j

    for j in shaped:  # one exit
        value = stream + calls[j].output
        k = target(value, j)
        if k is not None:
            j = latest_same(j, k, set())
            entries = [i for i in readers if i < j]
            if entries:
                return entries, [j], value, k
    for a_index, j1 in enumerate(shaped):  # two exits: a parallel block
        for j2 in shaped[a_index + 1 :]:
            value = stream + calls[j1].output + calls[j2].output
            k = target(value, j2)
            if k is None:
                continue
            e2 = latest_same(j2, k, {j1})
            e1 = latest_same(j1, k, {e2})
            exits = sorted({e1, e2})
            entries = [i for i in readers if i < exits[0] or (i < exits[-1] and i not in exits)]
            if len(exits) == 2 and entries:
                return entries, exits, value, k
    return None


def _tolerance(model: nn.Module) -> float:
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if dtypes and min(torch.finfo(d).bits for d in dtypes) < 32:
        return 2e-2
    return 1e-4


@torch.no_grad()
def probe_structure(
    model: nn.Module, layers_path: str, inputs: torch.Tensor | dict[str, torch.Tensor]
) -> list[_LayerRecord]:
    """Run ``model`` once on ``inputs`` (token ids, or forward keyword arguments) and describe each
    layer of ``layers_path`` (see the module docstring)."""
    stack = model.get_submodule(layers_path)
    records = [_LayerRecord() for _ in stack]
    handles = []
    counter = [0]
    rtol = _tolerance(model)

    def layer_pre(record: _LayerRecord, module: nn.Module, args: tuple, kwargs: dict) -> None:
        record.calls += 1
        record.order = counter[0]
        counter[0] += 1
        record.input = _snapshot(_hidden_of(args, kwargs))
        record.children = []

    def layer_post(record: _LayerRecord, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        record.output = _snapshot(_first_tensor(output))
        record.block = _analyse_layer(module, record, rtol)
        record.children = []  # keep no activations beyond one layer

    def child_post(record: _LayerRecord, name: str, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        record.children.append(_Call(name, _snapshot(_hidden_of(args, kwargs)), _snapshot(_first_tensor(output))))

    try:
        for layer, record in zip(stack, records, strict=True):
            handles.append(layer.register_forward_pre_hook(functools.partial(layer_pre, record), with_kwargs=True))
            handles.append(layer.register_forward_hook(functools.partial(layer_post, record), with_kwargs=True))
            for name, child in layer.named_children():
                handles.append(
                    child.register_forward_hook(functools.partial(child_post, record, name), with_kwargs=True)
                )
        modes = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            if isinstance(inputs, torch.Tensor):
                model(input_ids=inputs, attention_mask=torch.ones_like(inputs))
            else:
                model(**inputs)
        finally:
            for module, training in modes:
                module.training = training
    finally:
        for handle in handles:
            handle.remove()
    return records


def _stack_problem(records: list[_LayerRecord], rtol: float) -> str | None:
    """Why the stack is not a plain chain of layers (each once, in order, hidden states in and out)."""
    if any(r.calls != 1 for r in records):
        return f"layers were called {[r.calls for r in records]} times (not once each)"
    if [r.order for r in records] != sorted(r.order for r in records):
        return "layers were not called in order"
    if any(r.input is None for r in records):
        return "a layer does not take hidden_states as its first argument"
    for i, (prev, nxt) in enumerate(itertools.pairwise(records)):
        if not _close(nxt.input, prev.output, rtol):
            return (
                f"the hidden states change between entries {i} and {i + 1} (the model computes between them: "
                "its entries are not whole layers)"
            )
    return None


def discover(model: nn.Module, inputs: torch.Tensor | dict[str, torch.Tensor]) -> tuple[list[Family], list[str]]:
    """Candidate adapters for ``model``, most specific first, and notes on what was not usable.

    The candidates are the per-layer discovered structure and then the whole-layer fallback, each
    on the first layer stack that behaves as a chain of layers.
    """
    model_type = str(getattr(model.config, "model_type", type(model).__name__))
    notes: list[str] = []
    rtol = _tolerance(model)
    for path in layer_stack_candidates(model):
        try:
            records = probe_structure(model, path, inputs)
        except Exception as err:  # the original model itself fails: nothing to retrofit
            raise UnsupportedArchitectureError(
                f"cannot convert {model_type!r}: the original model fails on a probe batch ({type(err).__name__}: {err})"
            ) from err
        problem = _stack_problem(records, rtol)
        if problem:
            notes.append(f"{path}: {problem}")
            continue
        blocks = tuple(r.block or Block("layer") for r in records)
        candidates = []
        if any(b.kind != "layer" for b in blocks):
            if len(set(blocks)) == 1:
                candidates.append(Family((model_type,), path, blocks[0]))
            else:
                candidates.append(Family((model_type,), path, blocks[0], layer_blocks=blocks))
        candidates.append(Family((model_type,), path, Block("layer")))
        return candidates, notes
    if not notes:
        notes.append(
            "no ModuleList of layers (none has num_hidden_layers entries or a _no_split_modules class; "
            "a model that reuses one layer, as ALBERT does, has none)"
        )
    return [], notes
