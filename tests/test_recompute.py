"""Mid-layer streams recomputed in backward (patch._recompute_source): same gradients, less memory.

A converted layer's second site reads ``H1 = R0 H0 + b0 (x) y0``, the layer's add of its first
site's outputs. When the autograd graph shows exactly that add, the second site's Functions save
``(H0, R0, b0, y0)`` (saved anyway) and recompute ``H1`` in backward instead of saving it.
"""

import pytest
import torch

import hc_retrofit
from hc_retrofit import HCConfig, patch
from tests.tiny import VOCAB, tiny_model

VARIANTS = ["static", "dynamic", "mhc"]
CASES = ["llama-gqa-untied", "gemma2-sandwich", "phi3", "olmo2", "gpt_neox-sequential", "granite-multipliers"]


def trained(case: str, variant: str, dropout: float = 0.0):
    model = hc_retrofit.convert(tiny_model(case), HCConfig(num_streams=4, variant=variant, dynamic_scale_init=0.5))
    with torch.no_grad():
        for p in (p for n, p in model.named_parameters() if "hyper_connections" in n):
            p.add_(torch.randn_like(p) * 0.1)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = dropout
    return model.train()


def run(model, ids):
    """Gradients, saved-activation bytes, and how many sites recomputed their streams."""
    from bench._common import saved_activation_bytes

    calls = []
    original = patch._recompute_source

    def spy(routed, streams):
        calls.append(original(routed, streams))
        return calls[-1]

    patch._recompute_source = spy
    try:
        torch.manual_seed(0)
        model.zero_grad()
        with saved_activation_bytes(exclude=list(model.parameters())) as saved:
            loss = model(ids, labels=ids).loss
        loss.backward()
    finally:
        patch._recompute_source = original
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return grads, saved["bytes"], sum(c is not None for c in calls)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_recomputed_streams_give_the_same_gradients_and_save_memory(case, variant, monkeypatch):
    model = trained(case, variant)
    ids = torch.randint(3, VOCAB, (2, 10))
    grads, saved, recomputed = run(model, ids)
    monkeypatch.setattr(patch, "_recompute_source", lambda routed, streams: None)
    ref_grads, ref_saved, _ = run(model, ids)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-6, rtol=1e-5)
    layers = len(patch.decoder_layers(model))
    if case == "granite-multipliers":  # the layer adds m * (b (x) y): not the plain sum, so saved
        assert recomputed == 0 and saved == ref_saved
    else:
        assert recomputed == layers and saved < ref_saved


def test_dropout_between_exit_and_add_falls_back_to_saving():
    # phi3 applies resid_attn_dropout to the exit's output before the add: the graph shows it.
    model = trained("phi3", "mhc", dropout=0.1)
    ids = torch.randint(3, VOCAB, (2, 10))
    _, _, recomputed = run(model, ids)
    assert recomputed == 0


def test_shared_recomputation_survives_a_retained_graph():
    model = trained("llama-gqa-untied", "dynamic")
    ids = torch.randint(3, VOCAB, (2, 10))
    loss = model(ids, labels=ids).loss
    loss.backward(retain_graph=True)
    first = {n: p.grad.clone() for n, p in model.named_parameters()}
    loss.backward()  # the graph runs again: every recomputation happens again, and matches
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, 2 * first[n])
