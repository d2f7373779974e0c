"""``torch.compile`` sees a converted model as plain tensor code.

No graph breaks beyond the original's (training forward and a cached decode step), ``fullgraph``
on every converted decoder layer, and compiled losses and gradients equal to eager. The compiled
runs use the ``aot_eager`` backend: it traces forward and backward exactly as Inductor receives
them, without the minutes of C++ compilation (``bench/train_step.py --compile`` times Inductor).
"""

from __future__ import annotations

import copy
import operator

import pytest
import torch
from transformers import AutoModelForCausalLM

import hc_retrofit
from hc_retrofit import HCConfig
from hc_retrofit.modeling import patch, sinkhorn_knopp
from tests.tiny import VOCAB, tiny_config

VARIANTS = ["static", "dynamic", "mhc"]


def tiny_llama(variant: str | None):
    """A 2-layer llama (hidden 32), converted to ``variant`` (``None``: the original), HC weights random."""
    config = tiny_config("llama-gqa-untied")
    config.num_hidden_layers = 2
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    if variant is not None:
        hc_retrofit.convert(model, HCConfig(num_streams=4, variant=variant, dynamic_scale_init=0.5))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "hyper_connections" in name:
                    p.add_(torch.randn_like(p) * 0.1)
    return model


def ids(batch: int = 2, length: int = 8) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(1))


def training_breaks(model) -> int:
    torch._dynamo.reset()
    x = ids()
    return torch._dynamo.explain(model.train())(x, labels=x).graph_break_count


def decode_breaks(model) -> int:
    model.eval()
    x = ids()
    with torch.no_grad():
        cache = model(x, use_cache=True).cache
        torch._dynamo.reset()
        return torch._dynamo.explain(model)(x[:, -1:], cache=cache, use_cache=True).graph_break_count


@pytest.fixture(scope="module")
def original_breaks() -> dict[str, int]:
    original = tiny_llama(None)
    return {"train": training_breaks(original), "decode": decode_breaks(original)}


@pytest.mark.parametrize("variant", VARIANTS)
def test_no_more_graph_breaks_than_the_original(variant, original_breaks):
    model = tiny_llama(variant)
    assert training_breaks(model) <= original_breaks["train"]
    assert decode_breaks(model) <= original_breaks["decode"]


def compile_layers(model) -> None:
    for layer in patch.decoder_layers(model):
        layer.compile(backend="aot_eager", fullgraph=True)


@pytest.mark.parametrize("variant", ["dynamic", "mhc"])  # static HC's path is dynamic HC's without the projection
def test_fullgraph_decoder_layers_train_and_decode(variant):
    torch._dynamo.reset()
    eager = tiny_llama(variant)
    model = copy.deepcopy(eager)
    compile_layers(model)  # fullgraph: any graph break in a layer raises
    x = ids()
    model.train(), eager.train()
    loss = model(x, labels=x).loss
    loss.backward()
    ref = eager(x, labels=x).loss
    ref.backward()
    torch.testing.assert_close(loss, ref)
    grads = {n: p.grad for n, p in eager.named_parameters()}
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], atol=1e-6, rtol=1e-4, msg=name)
    model.eval(), eager.eval()
    with torch.no_grad():  # a prefill and a decode step through the compiled layers, with the KV cache
        out, ref_out = model(x, use_cache=True), eager(x, use_cache=True)
        step = model(x[:, -1:], cache=out.cache, use_cache=True).logits
        ref_step = eager(x[:, -1:], cache=ref_out.cache, use_cache=True).logits
    torch.testing.assert_close(out.logits, ref_out.logits)
    torch.testing.assert_close(step, ref_step)


def test_original_layers_compile_fullgraph_too():
    # The comparison above means something only if the original layer compiles in one graph.
    torch._dynamo.reset()
    model = tiny_llama(None)
    compile_layers(model)
    x = ids()
    model.train()(x, labels=x).loss.backward()


def test_mhc_sinkhorn_is_one_opaque_call_per_site_in_the_training_graph():
    # Unrolled (2 x 20 normalisations per site, forward and backward) it made mHC compile several
    # times slower than the original; the graph must hold one operator call per site instead.
    torch._dynamo.reset()
    model = tiny_llama("mhc").train()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    x = ids()
    torch.compile(model, backend=backend, fullgraph=True)(x, labels=x).loss.backward()
    targets = [str(node.target) for gm in graphs for node in gm.graph.nodes if node.op == "call_function"]
    sites = len(patch.hyper_connection_sites(model))
    assert sum("hc_retrofit.sinkhorn_v1" in t for t in targets) == sites
    assert not any("softmax" in t for t in targets)


def test_mhc_sinkhorn_is_one_region_compiled_once_in_a_compiled_decode_step(monkeypatch):
    # Without autograd: unrolled at every site, the 2 x 20 normalisations made a compiled decoding
    # step little faster and its compilation several times longer. They are one nested compile
    # region instead: traced once, called at every site (the default, whatever the environment says).
    monkeypatch.setattr(
        sinkhorn_knopp, "_compiled_region", sinkhorn_knopp._nested_region(sinkhorn_knopp._exp_domain, "auto")
    )
    torch._dynamo.reset()
    model = tiny_llama("mhc").eval()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    x = ids()
    with torch.no_grad():
        cache = model(x, use_cache=True).cache
        step = torch.compile(model, backend=backend, fullgraph=True)(x[:, -1:], cache=cache, use_cache=True)
    (gm,) = graphs
    calls = [node for node in gm.graph.nodes if node.op == "call_function"]
    regions = [node for node in calls if node.target is torch.ops.higher_order.invoke_subgraph]
    assert len(regions) == len(patch.hyper_connection_sites(model))
    assert len({node.args[1] for node in regions}) == 1  # one identifier: one region, traced once
    assert not any("sinkhorn" in str(node.target) or "softmax" in str(node.target) for node in calls)
    (region,) = [module for name, module in gm.named_children() if name.startswith("subgraph")]
    sums = [node for node in region.graph.nodes if node.target in ("sum", torch.sum)]
    assert len(sums) == 2 * HCConfig().sinkhorn_iters  # every normalisation, in the region
    with torch.no_grad():
        eager = model(x[:, -1:], cache=model(x, use_cache=True).cache, use_cache=True)
    torch.testing.assert_close(step.logits, eager.logits)


MATRIX_PRODUCTS = {operator.matmul, torch.matmul, torch.Tensor.matmul, torch.einsum, torch.bmm, torch.mm}


def decode_step_matrix_products(model) -> int:
    """Matrix products (not ``linear`` layers) in the graph Dynamo captures for one cached decode step."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    model.eval()
    x = ids()
    with torch.no_grad():
        cache = model(x, use_cache=True).cache
        torch.compile(model, backend=backend, fullgraph=True)(x[:, -1:], cache=cache, use_cache=True)
    return sum(node.target in MATRIX_PRODUCTS for gm in graphs for node in gm.graph.nodes)


@pytest.mark.parametrize("variant", ["static", "dynamic"])
def test_compiled_decode_step_mixes_streams_without_matrix_products(variant):
    # Inductor fuses products and sums into its generated loops but calls a library matmul for each
    # matrix product: as a bmm per site, the width connection and the mix split each site's fused
    # kernel (the residual's neighbours) in three. Only a dynamic site's projection is a product.
    model = tiny_llama(variant)
    sites = len(patch.hyper_connection_sites(model))
    extra = sites if variant == "dynamic" else 0
    assert decode_step_matrix_products(model) == decode_step_matrix_products(tiny_llama(None)) + extra
