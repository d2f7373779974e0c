"""Mid-layer streams recomputed in backward (stream_placement.recomputes): same gradients, less memory.

A converted layer's second site reads ``H1 = R0 H0 + b0 (x) y0``, the layer's add of its first
site's outputs. Where the block structure says so (decided at convert time, dropout checked per
call), the second site's Functions save ``(H0, R0, b0, y0)`` (saved anyway) and recompute ``H1``
in backward instead of saving it.
"""

import pytest
import torch

import hc_retrofit
from hc_retrofit import HCConfig
from hc_retrofit.modeling import converted_layer, patch, stream_placement
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


def run(model, ids, recompute: bool = True):
    """Gradients, saved-activation bytes, and how many layer calls recomputed their streams."""
    from bench._common import saved_activation_bytes

    calls = []
    original = converted_layer.recomputes

    def spy(layer):
        calls.append(original(layer) and recompute)
        return calls[-1]

    converted_layer.recomputes = spy
    try:
        torch.manual_seed(0)
        model.zero_grad()
        with saved_activation_bytes(exclude=list(model.parameters())) as saved:
            loss = model(ids, labels=ids).loss
        loss.backward()
    finally:
        converted_layer.recomputes = original
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return grads, saved["bytes"], sum(calls)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_recomputed_streams_give_the_same_gradients_and_save_memory(case, variant):
    model = trained(case, variant)
    ids = torch.randint(3, VOCAB, (2, 10))
    grads, saved, recomputed = run(model, ids)
    ref_grads, ref_saved, _ = run(model, ids, recompute=False)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-6, rtol=1e-5)
    layers = len(patch.decoder_layers(model))
    if case == "granite-multipliers":  # the layer adds m * (b (x) y): not the plain sum, so saved
        assert recomputed == 0 and saved == ref_saved
    else:
        assert recomputed == layers and saved < ref_saved


def test_dropout_module_inside_the_branch_keeps_recomputation_while_training():
    # phi3's first exit is resid_attn_dropout itself (the dropout is part of the branch), so the
    # layer adds the exit's output unchanged: recomputation stays on, with the same gradients.
    model = trained("phi3", "mhc", dropout=0.1)
    ids = torch.randint(3, VOCAB, (2, 10))
    grads, _, recomputed = run(model, ids)
    ref_grads, _, _ = run(model, ids, recompute=False)
    assert recomputed == len(patch.decoder_layers(model))
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(("case", "config_key"), [("falcon-sequential-alibi", "attention_dropout")])
def test_dropout_between_exit_and_add_falls_back_to_saving(case, config_key):
    # falcon's dropout_add reads config.attention_dropout: active while training, it turns
    # recomputation off.
    model = trained(case, "mhc", dropout=0.1)
    if config_key:
        setattr(model.config, config_key, 0.1)
    ids = torch.randint(3, VOCAB, (2, 10))
    grads, _, recomputed = run(model, ids)
    assert recomputed == 0
    model.eval()  # no dropout at evaluation: recomputation is back, and matches saving
    grads, _, recomputed = run(model, ids)
    ref_grads, _, _ = run(model, ids, recompute=False)
    assert recomputed == len(patch.decoder_layers(model))
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_streams_beside_the_layer_match_the_layer_adding_them(case, variant):
    # Where the structure allows, the hooks compute the streams and the layer's own adds see only
    # (B, T, D) tensors; letting the layer add the streams (its exits return what to add) is the
    # same function: the same logits and gradients up to float rounding.
    model = trained(case, variant)
    ids = torch.randint(3, VOCAB, (2, 10))
    layers = patch.decoder_layers(model)
    flags = [layer._hc_recompute for layer in layers]
    beside = [stream_placement.beside_layer(layer) for layer in layers]
    assert all(beside) == (case != "granite-multipliers") and any(beside) == all(beside)
    grads, _, _ = run(model, ids)
    with torch.no_grad():
        logits = model(ids).logits
    for layer in layers:
        layer._hc_recompute = False
    try:
        ref_grads, _, _ = run(model, ids)
        with torch.no_grad():
            ref_logits = model(ids).logits
    finally:
        for layer, flag in zip(layers, flags, strict=True):
            layer._hc_recompute = flag
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=2e-5, rtol=1e-4)


def test_shared_recomputation_survives_a_retained_graph():
    model = trained("llama-gqa-untied", "dynamic")
    ids = torch.randint(3, VOCAB, (2, 10))
    loss = model(ids, labels=ids).loss
    loss.backward(retain_graph=True)
    first = {n: p.grad.clone() for n, p in model.named_parameters()}
    loss.backward()  # the graph runs again: every recomputation happens again, and matches
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, 2 * first[n])
