"""HC parameter group, schedule, and HC-only warmup."""

from __future__ import annotations

import pytest
import torch

import hc_retrofit
from hc_retrofit.train.optim import build_optimizer, build_scheduler, drop_base_gradients, is_hc_parameter, lr_factor

from .conftest import tiny_lm


def test_hc_group_has_its_own_lr_and_no_weight_decay(tokenizer):
    model = hc_retrofit.convert(tiny_lm(tokenizer), hc_retrofit.HCConfig(num_streams=4, variant="mhc"))
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1, hc_lr_multiplier=7.0)
    groups = {g["group"]: g for g in opt.param_groups}
    assert set(groups) == {"base/decay", "base/no_decay", "hc"}
    assert groups["hc"]["lr"] == pytest.approx(7e-3) and groups["hc"]["weight_decay"] == 0.0
    assert groups["base/decay"]["lr"] == pytest.approx(1e-3) and groups["base/decay"]["weight_decay"] == 0.1
    assert groups["base/no_decay"]["weight_decay"] == 0.0
    assert all(p.ndim == 1 for p in groups["base/no_decay"]["params"])
    hc_ids = {id(p) for site in hc_retrofit.hyper_connection_sites(model) for p in site.parameters()}
    assert {id(p) for p in groups["hc"]["params"]} == hc_ids
    assert all(is_hc_parameter(n) for n in groups["hc"]["names"])
    # every trainable parameter in exactly one group
    seen = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters()) and len(seen) == len(set(seen))


def test_plain_model_has_no_hc_group(tokenizer):
    opt = build_optimizer(tiny_lm(tokenizer), lr=1e-3)
    assert "hc" not in {g["group"] for g in opt.param_groups}


def test_warmup_then_cosine_keeps_the_hc_multiplier(tokenizer):
    assert lr_factor(0, warmup_steps=4, max_steps=20, min_lr_ratio=0.1) == pytest.approx(0.25)
    assert lr_factor(3, warmup_steps=4, max_steps=20, min_lr_ratio=0.1) == pytest.approx(1.0)
    assert lr_factor(4, warmup_steps=4, max_steps=20, min_lr_ratio=0.1) == pytest.approx(1.0)
    assert lr_factor(20, warmup_steps=4, max_steps=20, min_lr_ratio=0.1) == pytest.approx(0.1)
    model = hc_retrofit.convert(tiny_lm(tokenizer))
    opt = build_optimizer(model, lr=1.0, hc_lr_multiplier=10.0)
    sched = build_scheduler(opt, warmup_steps=2, max_steps=10, min_lr_ratio=0.0)
    for _ in range(5):
        opt.step()
        sched.step()
        groups = {g["group"]: g["lr"] for g in opt.param_groups}
        assert groups["hc"] == pytest.approx(10 * groups["base/decay"])


def test_drop_base_gradients_freezes_the_base_only(tokenizer):
    model = hc_retrofit.convert(tiny_lm(tokenizer))
    opt = build_optimizer(model, lr=1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randint(0, len(tokenizer), (2, 16))
    model(input_ids=x, labels=x).loss.backward()
    drop_base_gradients(opt)
    opt.step()
    for name, p in model.named_parameters():
        changed = not torch.equal(p, before[name])
        assert changed == is_hc_parameter(name) or (is_hc_parameter(name) and p.grad is not None), name
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if is_hc_parameter(n))
