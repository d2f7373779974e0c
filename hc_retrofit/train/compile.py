"""Regional compilation for training: every decoder layer ``torch.compile``'d in place.

A model is dozens of identical decoder layers, so compiling each layer (rather than the whole
model) compiles one graph and reuses it for every layer of the same class and shapes: compile
time stays near one layer's, however deep the model. On a GPU this is how the HC stream
operations get fused with their neighbours (Inductor writes Triton kernels); on a CPU Inductor
writes C++. A converted layer traces in one graph (its hooks are plain tensor code), as the
original does.

Layers are compiled *in place* (``nn.Module.compile``), before ``accelerator.prepare``, as
torchtitan applies compilation before FSDP: parameter names, ``state_dict`` keys, checkpoints and
FSDP2's per-layer wrapping (which finds decoder layers by class name) are unchanged.
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["COMPILE_BACKENDS", "compile_layers", "decoder_layer_list"]

#: ``torch.compile`` backends a run may choose: ``inductor`` generates fused code (the default);
#: ``aot_eager`` traces forward and backward without generating code (a quick check that a model
#: compiles); ``eager`` only runs Dynamo.
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")


def decoder_layer_list(model: nn.Module) -> nn.ModuleList:
    """The model's decoder layers: what its family adapter names, else the longest ``ModuleList``
    (a plain model of a family without an adapter, trained with ``--no-hc``)."""
    from hc_retrofit.modeling.errors import UnsupportedArchitectureError
    from hc_retrofit.modeling.patch import decoder_layers

    try:
        return decoder_layers(model)
    except (UnsupportedArchitectureError, AttributeError):
        lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
        if not lists:
            raise UnsupportedArchitectureError(
                f"{type(model).__name__} has no list of layers to compile; train without --compile"
            ) from None
        return max(lists, key=len)


def compile_layers(model: nn.Module, *, backend: str = "inductor", **options: Any) -> int:
    """``torch.compile`` every decoder layer of ``model`` in place; return how many.

    ``options`` go to ``torch.compile`` (e.g. ``mode="max-autotune"``). The layers' parameters and
    their names are unchanged, so optimisers, checkpoints and FSDP wrapping see the same model.
    """
    if backend not in COMPILE_BACKENDS:
        raise ValueError(f"unknown compile backend {backend!r}: choose one of {', '.join(COMPILE_BACKENDS)}")
    layers = decoder_layer_list(model)
    for layer in layers:
        layer.compile(backend=backend, **options)
    return len(layers)
