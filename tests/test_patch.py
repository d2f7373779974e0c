"""convert() on every family: exactness, one branch call per site, trainability, clear refusals."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import hc_retrofit
from hc_retrofit import AlreadyConvertedError, ConfigError, HCConfig, UnsupportedArchitectureError
from hc_retrofit.modeling.families import FAMILIES, family_for
from hc_retrofit.modeling.patch import decoder_layers
from tests.tiny import CASES, VOCAB, tiny_model

VARIANTS = ["static", "dynamic", "mhc"]
ALL = [(case, variant) for case in CASES for variant in VARIANTS]


def converted(case: str, variant: str, **kwargs):
    base = tiny_model(case)
    return base, hc_retrofit.convert(copy.deepcopy(base), HCConfig(variant=variant, **kwargs))


def left_padded_batch():
    torch.manual_seed(1)
    ids = torch.randint(3, VOCAB, (3, 9))
    mask = torch.ones_like(ids)
    ids[0, :4], mask[0, :4] = 0, 0
    ids[1, :2], mask[1, :2] = 0, 0
    return ids, mask


@pytest.mark.parametrize(("case", "variant"), ALL)
def test_logits_and_greedy_generation_are_exact(case, variant):
    base, model = converted(case, variant)
    ids, mask = left_padded_batch()
    with torch.no_grad():
        diff = (model(ids, attention_mask=mask).logits - base(ids, attention_mask=mask).logits).abs()
    assert diff[mask.bool()].max().item() <= 1e-4
    gen = dict(max_new_tokens=6, do_sample=False, attention_mask=mask, pad_token_id=0, use_cache=True)
    assert torch.equal(model.generate(ids, **gen), base.generate(ids, **gen))


@pytest.mark.parametrize("case", list(CASES))
def test_use_cache_false_generation_matches(case):
    base, model = converted(case, "mhc")
    ids = torch.randint(3, VOCAB, (1, 5))
    gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, use_cache=False)
    assert torch.equal(model.generate(ids, **gen), base.generate(ids, **gen))


@pytest.mark.parametrize("case", list(CASES))
def test_branches_run_once_on_the_collapsed_batch(case):
    _, model = converted(case, "mhc")
    family = family_for(model.config)
    block = family.block_for(model.config)
    layer = decoder_layers(model)[1]
    names = {name for site in block.sites for name in site.exits} or {"self_attn", "fc1"}  # opt: whole layer
    seen: list[tuple[str, tuple[int, ...]]] = []
    for name, module in layer.named_children():
        if name in names and name != "hyper_connections":
            module.register_forward_pre_hook(
                lambda m, args, kwargs, name=name: seen.append(
                    (name, tuple((args or (kwargs["hidden_states"],))[0].shape))
                ),
                with_kwargs=True,
            )
    ids = torch.randint(3, VOCAB, (2, 7))
    with torch.no_grad():
        model(ids)
    assert seen, "no branch module observed"
    assert sorted(n for n, _ in seen) == sorted(set(n for n, _ in seen))  # each once per forward
    for name, shape in seen:
        assert shape[0] in (2, 2 * 7) and 4 not in shape[:2] and shape[-1] == 32, (name, shape)


def stream_spread(model, ids) -> float:
    """Relative spread of the streams entering the last layer (0 when all streams are equal)."""
    got = {}
    last = decoder_layers(model)[-1]

    def grab(module, args, kwargs):
        got["h"] = (args or (kwargs["hidden_states"],))[0].detach()

    handle = last.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        model(ids)
    handle.remove()
    h = got["h"]
    return ((h - h.mean(-2, keepdim=True)).norm() / h.norm()).item()


@pytest.mark.parametrize(("case", "variant"), ALL)
def test_hc_parameters_get_gradients_and_streams_diverge(case, variant):
    _, model = converted(case, variant)
    model.train()
    for module in model.modules():  # dropout would make the check noisy, not different
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    torch.manual_seed(0)
    ids = torch.randint(3, VOCAB, (4, 12))
    assert stream_spread(model, ids) < 1e-5
    hc_params = {n: p for n, p in model.named_parameters() if "hyper_connections" in n}
    assert hc_params and all(p.dtype == torch.float32 for p in hc_params.values())
    largest = dict.fromkeys(hc_params, 0.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(6):
        opt.zero_grad()
        model(ids, labels=ids).loss.backward()
        for name, p in hc_params.items():
            largest[name] = max(largest[name], p.grad.abs().max().item() if p.grad is not None else 0.0)
        if step == 0:  # b learns from the first step, and breaks the tie between streams
            assert all(v > 1e-5 for n, v in largest.items() if n.endswith(("depth", "depth_logits"))), largest
        opt.step()
    # At init every stream equals h. Then a only rescales x, which a pre-norm cancels, and a
    # row-stochastic R (mHC) maps H to itself whatever its entries: both get ~0 gradient until b
    # makes the streams differ (likewise s in s * tanh(norm(H) W) until W moves off 0).
    # Structurally dead, by the maths: the network's first site always reads n copies of the
    # embedding, so its a and R never matter; with mHC, the last site's R is (doubly) column-
    # stochastic and followed by the mean over streams, which it therefore cannot change.
    names = {m: n for n, m in model.named_modules()}
    sites = hc_retrofit.hyper_connection_sites(model)
    dead = {f"{names[sites[0]]}.{p}" for p in ("width", "residual", "width_logits", "residual_logits")}
    dead.add(f"{names[sites[-1]]}.residual_logits")
    low = {n: v for n, v in largest.items() if n not in dead and v <= 1e-7}
    assert not low, low
    assert stream_spread(model, ids) > 1e-3


@pytest.mark.parametrize("variant", VARIANTS)
def test_uniform_width_weights_would_lock_the_streams(variant):
    """The trap the default init avoids: with uniform a (and b, R symmetric), streams never diverge."""
    _, model = converted("llama-gqa-untied", variant)
    with torch.no_grad():
        for site in hc_retrofit.hyper_connection_sites(model):
            if variant == "mhc":
                site.width_logits.fill_(torch.logit(torch.tensor(0.25)).item())
            else:
                site.width.fill_(0.25)
    model.train()
    ids = torch.randint(3, VOCAB, (4, 12))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        model(ids, labels=ids).loss.backward()
        opt.step()
    assert stream_spread(model, ids) < 1e-5


@pytest.mark.parametrize("case", ["llama-gqa-untied", "gpt2", "gemma2-sandwich", "gpt_neox-parallel", "opt-post-ln"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_gradient_checkpointing_gives_the_same_gradients(case, variant):
    _, model = converted(case, variant)
    with torch.no_grad():  # move HC params off init so the check covers the HC maths
        for p in (p for n, p in model.named_parameters() if "hyper_connections" in n):
            p.add_(torch.randn_like(p) * 0.05)
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    ids = torch.randint(3, VOCAB, (2, 10))

    def grads():
        torch.manual_seed(0)  # functional dropout (e.g. OPT) draws the same masks in both runs
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("case", ["llama-gqa-untied", "gemma2-sandwich", "phi-parallel", "granite-multipliers"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_bf16_error_is_within_the_originals_bf16_noise(case, variant):
    base = tiny_model(case)
    ids = torch.randint(3, VOCAB, (2, 12))
    with torch.no_grad():
        reference = base(ids).logits
        base_bf16 = copy.deepcopy(base).to(torch.bfloat16)
        noise = (base_bf16(ids).logits.float() - reference).abs().max().item()
        model = hc_retrofit.convert(base_bf16, HCConfig(variant=variant))
        assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "hyper_connections" in n)
        err = (model(ids).logits.float() - reference).abs().max().item()
    assert err <= 1.5 * noise + 1e-3


@pytest.mark.parametrize("variant", VARIANTS)
def test_hc_weights_on_random_values_are_not_exact(variant):
    """Guards against a retrofit that ignores its HC weights: perturbing them changes the output."""
    base, model = converted("llama-gqa-untied", variant)
    with torch.no_grad():
        for site in hc_retrofit.hyper_connection_sites(model):
            for p in site.parameters():
                p.add_(torch.randn_like(p) * 0.3)
    ids = torch.randint(3, VOCAB, (2, 8))
    with torch.no_grad():
        assert (model(ids).logits - base(ids).logits).abs().max() > 1e-3


def test_every_listed_family_has_a_test_case():
    tested = {tiny_model_type for tiny_model_type, _ in CASES.values()}
    assert set(FAMILIES) == tested


def test_register_family_refuses_to_replace_silently(monkeypatch):
    from hc_retrofit.modeling.families import register_family

    monkeypatch.setattr("hc_retrofit.modeling.families.FAMILIES", dict(FAMILIES))
    import hc_retrofit.modeling.families as families

    llama = families.FAMILIES["llama"]
    mine = dataclasses.replace(llama, model_types=("llama", "my_llama"))
    with pytest.raises(ConfigError, match=r"'llama' already has a family.*replace=True"):
        register_family(mine)
    assert families.FAMILIES["llama"] is llama and "my_llama" not in families.FAMILIES  # nothing half-registered
    assert register_family(llama) is llama  # the same adapter again: fine
    register_family(mine, replace=True)
    assert families.FAMILIES["llama"] is mine and families.FAMILIES["my_llama"] is mine


def test_refuses_already_converted_model():
    _, model = converted("llama-gqa-untied", "mhc")
    with pytest.raises(AlreadyConvertedError, match="already has hyper-connections"):
        hc_retrofit.convert(model, HCConfig())


def test_an_architecture_without_a_family_converts_through_discovery():
    config = AutoConfig.for_model(
        "gpt_bigcode", n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2
    )
    assert "gpt_bigcode" not in FAMILIES
    base = AutoModelForCausalLM.from_config(config).eval()
    model = hc_retrofit.convert(copy.deepcopy(base), HCConfig())
    assert family_for(model.config).block_for(model.config).kind == "sequential"
    ids = torch.randint(3, VOCAB, (2, 8))
    with torch.no_grad():
        assert (model(ids).logits - base(ids).logits).abs().max() <= 1e-4


def test_a_base_model_without_lm_head_converts_on_its_own_layer_list():
    base = tiny_model("gpt2").transformer  # GPT2Model: the gpt2 family's "transformer.h" is "h" here
    model = hc_retrofit.convert(copy.deepcopy(base), HCConfig())
    assert decoder_layers(model) is model.h  # the family's "transformer.h", read from the base model
    assert all(type(layer).__name__.startswith("HC") for layer in model.h)
    ids = torch.randint(3, VOCAB, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).last_hidden_state, base(ids).last_hidden_state, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kwargs", [dict(num_streams=1), dict(num_streams=0), dict(variant="unknown")])
def test_refuses_bad_settings(kwargs):
    with pytest.raises(ConfigError):
        hc_retrofit.convert(tiny_model("llama-gqa-untied"), HCConfig(**kwargs))


def test_records_settings_and_adds_one_site_per_branch():
    _, model = converted("llama-gqa-untied", "mhc", num_streams=2)
    assert model.hc_config.num_streams == 2
    assert model.config.hc_retrofit == HCConfig(variant="mhc", num_streams=2).to_dict()
    sites = hc_retrofit.hyper_connection_sites(model)
    assert len(sites) == 2 * model.config.num_hidden_layers
    assert [s.site_index for s in sites] == list(range(len(sites)))
    _, opt = converted("opt-post-ln", "static")
    assert len(hc_retrofit.hyper_connection_sites(opt)) == opt.config.num_hidden_layers


def test_deepcopy_of_a_converted_model_uses_its_own_hc_parameters():
    base, model = converted("llama-gqa-untied", "static")
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for site in hc_retrofit.hyper_connection_sites(clone):
            site.depth.mul_(3.0)
    ids = torch.randint(3, VOCAB, (2, 8))
    with torch.no_grad():
        assert (model(ids).logits - base(ids).logits).abs().max() < 1e-5
        assert (clone(ids).logits - base(ids).logits).abs().max() > 1e-3


def test_output_hidden_states_still_works():
    base, model = converted("llama-gqa-untied", "mhc")
    ids = torch.randint(3, VOCAB, (2, 8))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        ref = base(ids, output_hidden_states=True)
    torch.testing.assert_close(out.hidden_states[-1], ref.hidden_states[-1], atol=1e-5, rtol=1e-5)


def test_layer_class_names_are_kept_for_fsdp_and_device_map():
    base = tiny_model("llama-gqa-untied")
    names = {type(layer).__name__ for layer in decoder_layers(base)}
    model = hc_retrofit.convert(base, HCConfig())
    assert {type(layer).__name__ for layer in decoder_layers(model)} == {f"HC{name}" for name in names}
    assert set(model._no_split_modules) >= {f"HC{name}" for name in names}


def test_a_refused_adapter_leaves_the_model_untouched():
    """patch.apply_family checks every named module of every layer before changing any."""
    from hc_retrofit.modeling import patch
    from hc_retrofit.modeling.families import PRE_NORM, Block, Family, Site

    base = tiny_model("llama-gqa-untied")
    bad = Family(("llama",), "model.layers", Block("sequential", (PRE_NORM.sites[0], Site(("nope",), ("mlp",)))))
    with pytest.raises(UnsupportedArchitectureError, match="missing nope"):
        patch.apply_family(base, HCConfig(), family=bad)
    assert not hc_retrofit.is_converted(base)
    assert not any("hyper_connections" in n for n, _ in base.named_parameters())
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in base.modules())


def test_the_stream_width_of_a_multimodal_model_is_its_text_configs():
    from hc_retrofit.tiny_models import build_tiny

    model = build_tiny("got_ocr2")  # its tiny top-level config says hidden_size 32; the language model is 1024 wide
    text_width = model.config.get_text_config().hidden_size
    assert model.config.hidden_size != text_width
    converted = hc_retrofit.convert(model, HCConfig(variant="dynamic"))  # proven exact, or it raises
    assert {site.dim for site in hc_retrofit.hyper_connection_sites(converted)} == {text_width}
