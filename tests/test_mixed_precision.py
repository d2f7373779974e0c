"""Mixed precision (autocast, what accelerate's ``mixed_precision`` runs): HC coefficients stay float32.

The coefficients are tiny and precision-sensitive: under autocast their projection would run in
bfloat16 (and, before this was fixed, the projection's backward failed on the mixed dtypes).
CPU autocast exercises the same code path a GPU takes.
"""

from __future__ import annotations

import copy

import pytest
import torch

import hc_retrofit
from hc_retrofit import HCConfig, HyperConnection
from tests.tiny import VOCAB, tiny_model

VARIANTS = ["static", "dynamic", "mhc"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_coefficients_under_autocast_are_the_float32_ones(variant):
    hc = HyperConnection(16, HCConfig(num_streams=4, variant=variant, dynamic_scale_init=0.5), site_index=1)
    with torch.no_grad():
        for p in hc.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    h = torch.randn(2, 3, 4, 16)
    ref = hc.coefficients(h)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with_grad = hc.coefficients(h)
        with torch.no_grad():
            without = hc.coefficients(h)
    for c in (with_grad, without):
        for fast, slow in ((c.a, ref.a), (c.r, ref.r), (c.b, ref.b)):
            assert fast.dtype == torch.float32
            torch.testing.assert_close(fast, slow.expand_as(fast), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(("variant", "compiled"), [*((v, False) for v in VARIANTS), ("dynamic", True)])
def test_a_converted_model_trains_under_bf16_autocast_like_the_original(variant, compiled):
    base = tiny_model("llama-gqa-untied").train()
    model = hc_retrofit.convert(copy.deepcopy(base), HCConfig(num_streams=4, variant=variant)).train()
    ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    if compiled:
        torch._dynamo.reset()
        model = torch.compile(model, backend="aot_eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, labels=ids).loss
        ref = base(ids, labels=ids).loss
    loss.backward()
    torch.testing.assert_close(loss, ref, atol=1e-3, rtol=1e-3)  # exact at init, up to bf16 rounding
    grads = [p.grad for n, p in model.named_parameters() if "hyper_connections" in n]
    assert grads and all(g is not None and g.dtype == torch.float32 and g.isfinite().all() for g in grads)


@pytest.mark.parametrize("variant", VARIANTS)
def test_coefficients_from_low_precision_parameters_are_float32(variant):
    # FSDP2 with a bf16 MixedPrecisionPolicy hands the layer its parameters cast to bf16.
    hc = HyperConnection(16, HCConfig(num_streams=4, variant=variant, dynamic_scale_init=0.5), site_index=1)
    h = torch.randn(2, 3, 4, 16)
    ref = [t.detach().clone() for t in vars(hc.coefficients(h)).values()]  # (static: the parameters)
    for p in hc.parameters():
        p.data = p.data.bfloat16()  # (not through .to(): that keeps HC parameters float32)
    c = hc.coefficients(h)
    for fast, slow in zip((c.a, c.r, c.b), ref, strict=True):
        assert fast.dtype == torch.float32
        torch.testing.assert_close(fast, slow.expand_as(fast), atol=2e-2, rtol=2e-2)
