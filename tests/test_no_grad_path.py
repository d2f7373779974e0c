"""The no-grad path (evaluation, ``generate()``): plain torch ops and cached static coefficients.

Under ``torch.no_grad`` / ``inference_mode`` the stream operations skip their autograd Functions
and :class:`HyperConnection` serves the input-independent part of its coefficients from a cache.
Both must give the autograd path's values, and the cache must follow every parameter update.
"""

import copy

import pytest
import torch

from hc_retrofit import HCConfig, HyperConnection, depth_connection, expand_streams, sinkhorn, stream_mix
from hc_retrofit import width_connection as width
from hc_retrofit.connections import outer_streams, rms_project

SETTINGS = {
    "static": {"variant": "static"},
    "dynamic": {"variant": "dynamic", "dynamic_scale_init": 0.5},
    "mhc": {"variant": "mhc", "dynamic_scale_init": 0.5},
    "mhc-static": {"variant": "mhc", "mhc_dynamic": False},
    "ablated": {"variant": "mhc", "ablate": True},
}


def site(kind: str, dim: int = 8, site_index: int = 1) -> HyperConnection:
    torch.manual_seed(0)
    hc = HyperConnection(dim, HCConfig(num_streams=4, **SETTINGS[kind]), site_index=site_index)
    with torch.no_grad():
        for p in hc.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return hc


def assert_same(no_grad, grad, dtype=torch.float32):
    tol = {"atol": 1e-6, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(no_grad, grad.detach(), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("expanded", [False, True])
@pytest.mark.parametrize("per_token", [False, True])
def test_stream_ops_without_grad_match_the_functions(dtype, expanded, per_token):
    torch.manual_seed(1)
    lead = (2, 3)
    h = expand_streams(torch.randn(*lead, 8), 4) if expanded else torch.randn(*lead, 4, 8)
    h, y = h.to(dtype), torch.randn(*lead, 8, dtype=dtype)
    coef_lead = lead if per_token else ()
    a, b = torch.randn(*coef_lead, 4), torch.randn(*coef_lead, 4)
    r = torch.randn(*coef_lead, 4, 4)
    cases = [
        lambda: width(h, a),
        lambda: stream_mix(h, r),
        lambda: depth_connection(h, r, b, y),
        lambda: outer_streams(b, y),
    ]
    for case in cases:
        with torch.no_grad():
            fast = case()
        ref = case()
        assert fast.dtype == ref.dtype and fast.shape == ref.shape
        assert_same(fast, ref, dtype)


def test_rms_project_and_sinkhorn_without_grad_match():
    torch.manual_seed(2)
    x, w = torch.randn(5, 32), torch.randn(32, 6)
    for batch in [(), (3,), (200,)]:  # log domain for small batches, the exp-domain Function above
        logits = torch.randn(*batch, 4, 4) * 3
        with torch.no_grad():
            fast = sinkhorn(logits, 20)
        assert_same(fast, sinkhorn(logits, 20))
    with torch.no_grad():
        fast = rms_project(x, w)
    assert_same(fast, rms_project(x, w))


@pytest.mark.parametrize("kind", list(SETTINGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_grad_coefficients_match_autograd_coefficients(kind, dtype):
    hc = site(kind)
    h = torch.randn(2, 3, 4, 8)
    ref = hc.coefficients(h)
    for minus_identity in (False, True):
        with torch.no_grad():
            c = hc._no_grad_coefficients(h.to(dtype), dtype, minus_identity)
        r = ref.r - torch.eye(4) if minus_identity else ref.r
        for fast, slow in ((c.a, ref.a), (c.r, r), (c.b, ref.b)):
            assert fast.dtype == dtype
            assert_same(fast.float(), slow.expand_as(fast), dtype)
    with torch.inference_mode():  # the public method too, float32 as documented
        c = hc.coefficients(h)
    assert c.a.dtype == torch.float32
    assert_same(c.r, ref.r)


@pytest.mark.parametrize("kind", list(SETTINGS))
@pytest.mark.parametrize("lead", [(2, 3), (1, 1), (1,)])  # (1, 1), (1,): one token, decode's 2-D path
@pytest.mark.parametrize("expanded", [False, True])
def test_block_output_without_grad_matches(kind, lead, expanded):
    hc = site(kind)
    branch = torch.nn.Linear(8, 8)
    h = expand_streams(torch.randn(*lead, 8), 4) if expanded else torch.randn(*lead, 4, 8)
    with torch.inference_mode():
        fast = hc(h, branch)
        x, ctx = hc.width_connection(h, adds_input=True)  # the layer adds H itself
        fast_delta = h + hc.delta(ctx, branch(x))
    assert fast.shape == h.shape
    assert_same(fast, hc(h, branch))
    assert_same(fast_delta, hc(h, branch))


@pytest.mark.parametrize("kind", ["static", "dynamic", "mhc", "mhc-static"])
def test_cache_follows_optimizer_steps_and_is_never_used_with_grad(kind):
    hc = site(kind)
    h = torch.randn(2, 4, 8)
    opt = torch.optim.SGD(hc.parameters(), lr=0.5)
    for _ in range(3):
        with torch.no_grad():
            cached = hc.coefficients(h)
        assert hc._static_cache is not None
        # With grad enabled: a fresh graph to the parameters, never the cached tensors.
        c = hc.coefficients(h)
        assert c.r.requires_grad and c.r is not cached.r
        assert_same(cached.r, c.r)
        before = cached.r.clone()  # (static HC's cached a, R, b are views of the parameters)
        opt.zero_grad()
        (c.a.sum() + c.b.sum() + (c.r * torch.arange(16.0).view(4, 4)).sum()).backward()
        assert all(p.grad is not None for p in hc.parameters())
        opt.step()
        with torch.no_grad():
            after = hc.coefficients(h)
        assert not torch.allclose(after.r, before)  # the step moved R, and the cache saw it
        assert_same(after.r, hc.coefficients(h).r)


def test_cache_follows_load_state_dict_data_assignment_and_clear_cache():
    hc = site("mhc-static")
    other = site("mhc-static")
    with torch.no_grad():
        other.residual_logits.mul_(-1.0)
    expected = other.coefficients().r.detach()

    def no_grad_r():
        with torch.no_grad():
            return hc.coefficients().r

    no_grad_r()
    hc.load_state_dict(other.state_dict())
    assert_same(no_grad_r(), expected)
    hc.residual_logits.data = torch.zeros(4, 4)  # a new storage
    assert_same(no_grad_r(), torch.full((4, 4), 0.25))
    hc.residual_logits.data.copy_(other.residual_logits)  # through .data: invisible to versions
    hc.clear_cache()
    assert_same(no_grad_r(), expected)


def test_parameters_made_under_inference_mode_are_not_cached():
    with torch.inference_mode():
        hc = site("mhc-static")
        c = hc.coefficients()
        assert hc.__dict__.get("_static_cache") is None
        hc.residual_logits.mul_(-1.0)
        assert not torch.allclose(hc.coefficients().r, c.r)


def test_deepcopy_uses_its_own_parameters():
    hc = site("static")
    with torch.no_grad():
        hc.coefficients()
        twin = copy.deepcopy(hc)
        twin.residual.add_(1.0)
        assert_same(twin.coefficients().r, hc.residual + 1.0)
        assert_same(hc.coefficients().r, hc.residual)
