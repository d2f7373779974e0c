"""The HC hot path is device agnostic by construction: no tensor created on the CPU, no ``.item()``.

A converted model is moved to the ``meta`` device (shapes, no data) and run there: a training
forward and backward, a cached forward and one decoding step through the cache. Any tensor the
code creates without the streams' device lands on the CPU, which a dispatch mode sees; any
``.item()`` (a host sync per step on a GPU) raises on ``meta``. The original model is the control.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import hc_retrofit
from tests.tiny import VOCAB, tiny_model


class CPUTensors(TorchDispatchMode):
    """Records every operator that returns a tensor on the CPU."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(isinstance(t, torch.Tensor) and t.device.type == "cpu" for t in tree_flatten(out)[0]):
            self.ops.append(str(func))
        return out


@pytest.mark.parametrize("variant", [None, "static", "dynamic", "mhc"])
@pytest.mark.parametrize("case", ["llama-gqa-untied", "gpt_neox-parallel"])
def test_no_cpu_tensor_and_no_item_in_training_and_decoding(case, variant):
    model = tiny_model(case)
    if variant is not None:
        model = hc_retrofit.convert(model, hc_retrofit.HCConfig(num_streams=4, variant=variant))
    model = model.to("meta").train()
    ids = torch.randint(3, VOCAB, (2, 10)).to("meta")
    with CPUTensors() as seen:
        model(ids, labels=ids).loss.backward()
        assert any(p.grad is not None for n, p in model.named_parameters() if "hyper_connections" in n) or not variant
        model.eval()
        with torch.no_grad():
            cache = model(ids, use_cache=True).cache
            model(ids[:, -1:], cache=cache, use_cache=True)
    assert seen.ops == []
