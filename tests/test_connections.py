"""The HC maths against hand-computed examples and the exactness conditions."""

import pytest
import torch

from hc_retrofit import HCConfig, HyperConnection, depth_connection, expand_streams, reduce_streams, sinkhorn
from hc_retrofit.connections import initial_residual_logits, stream_mix, width_connection

VARIANTS = ["static", "dynamic", "mhc"]


def test_orientation_of_r_hand_computed():
    # Two streams, D = 1: H_0 = 1, H_1 = 10. R_jk is the weight of input k in output j.
    streams = torch.tensor([[1.0], [10.0]])
    r = torch.tensor([[0.0, 1.0], [0.5, 0.5]])  # output 0 takes stream 1; output 1 averages
    b = torch.tensor([2.0, 3.0])
    y = torch.tensor([100.0])
    assert stream_mix(streams, r).flatten().tolist() == [10.0, 5.5]
    assert depth_connection(streams, r, b, y).flatten().tolist() == [210.0, 305.5]
    a = torch.tensor([0.25, 0.75])
    assert width_connection(streams, a).tolist() == [0.25 + 7.5]


def test_dynamic_residual_column_k_comes_from_stream_k():
    # Dynamic HC: the projection of stream k feeds column k of R (paper's A_r row k).
    torch.manual_seed(0)
    hc = HyperConnection(4, HCConfig(num_streams=2, variant="dynamic", dynamic_scale_init=1.0))
    with torch.no_grad():
        hc.dynamic_proj.zero_()
        hc.dynamic_proj[:, 1:3] = 1.0  # every R entry responds to the (normed) stream it comes from
    streams = torch.stack([torch.ones(4), -torch.ones(4)])  # norm(H_0) = +1, norm(H_1) = -1
    r = hc.coefficients(streams).r
    t = torch.tanh(torch.tensor(4.0))
    expected = torch.eye(2) + torch.tensor([[t, -t], [t, -t]])
    torch.testing.assert_close(r, expected)


def test_sinkhorn_is_row_stochastic_and_doubly_stochastic():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 5) * 3
    p = sinkhorn(logits, 30)
    torch.testing.assert_close(p.sum(-1), torch.ones(3, 5), atol=1e-6, rtol=0)
    torch.testing.assert_close(p.sum(-2), torch.ones(3, 5), atol=1e-4, rtol=0)
    assert (p > 0).all()
    # Even one iteration ends exactly row-stochastic (what exactness needs).
    torch.testing.assert_close(sinkhorn(logits, 1).sum(-1), torch.ones(3, 5), atol=1e-6, rtol=0)


def test_sinkhorn_backward_matches_finite_differences():
    logits = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: sinkhorn(x, 5).double(), (logits,))


@pytest.mark.parametrize("n", [2, 3, 4, 8])
def test_initial_residual_logits_give_requested_diagonal(n):
    r = sinkhorn(initial_residual_logits(n, 0.7), 20)
    torch.testing.assert_close(torch.diagonal(r), torch.full((n,), 0.7))
    torch.testing.assert_close(r.sum(0), torch.ones(n))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("n", [2, 4, 8])
def test_init_satisfies_exactness_conditions(variant, n):
    for site in range(2 * n):
        hc = HyperConnection(16, HCConfig(num_streams=n, variant=variant), site_index=site)
        c = hc.coefficients(torch.randn(2, 3, n, 16))
        torch.testing.assert_close(c.a.sum(-1), torch.ones_like(c.a.sum(-1)))
        torch.testing.assert_close(c.b, torch.ones_like(c.b))
        torch.testing.assert_close(c.r.sum(-1), torch.ones_like(c.r.sum(-1)))
        # Not uniform: the favoured stream rotates with the site index (no symmetry lock).
        assert c.a.reshape(-1, n)[0].argmax().item() == site % n
        assert c.a.reshape(-1, n)[0].max() > c.a.reshape(-1, n)[0].min()


@pytest.mark.parametrize("variant", VARIANTS)
def test_standalone_block_equals_plain_residual_at_init(variant):
    torch.manual_seed(0)
    branch = torch.nn.Sequential(torch.nn.LayerNorm(16), torch.nn.Linear(16, 16))
    hcs = [HyperConnection(16, HCConfig(variant=variant), site_index=i) for i in range(3)]
    h = torch.randn(2, 5, 16)
    plain, streams = h, expand_streams(h, 4)
    for hc in hcs:
        plain = plain + branch(plain)
        streams = hc(streams, branch)
    torch.testing.assert_close(reduce_streams(streams), plain, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_ablated_site_is_a_plain_residual_even_after_training(variant):
    hc = HyperConnection(8, HCConfig(variant=variant, ablate=True))
    with torch.no_grad():
        for p in hc.parameters():
            p.add_(torch.randn_like(p))
    branch = torch.nn.Linear(8, 8)
    h = torch.randn(3, 8)
    out = hc(expand_streams(h, 4), branch)
    torch.testing.assert_close(out, expand_streams(h + branch(h), 4))


@pytest.mark.parametrize("variant", VARIANTS)
def test_parameters_stay_float32_when_cast(variant):
    hc = HyperConnection(8, HCConfig(variant=variant)).to(torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in hc.parameters())
    out = hc(expand_streams(torch.randn(2, 8, dtype=torch.bfloat16), 4), lambda x: x)
    assert out.dtype == torch.bfloat16


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_parameter_trains(variant):
    """All HC parameters get gradients; the dynamic scales only once W has moved off zero."""
    torch.manual_seed(0)
    hcs = torch.nn.ModuleList(HyperConnection(8, HCConfig(variant=variant), site_index=i) for i in range(4))
    branch = torch.nn.Linear(8, 8)
    opt = torch.optim.SGD(hcs.parameters(), lr=0.1)
    for step in range(2):
        opt.zero_grad()
        streams = expand_streams(torch.randn(4, 8), 4)
        for hc in hcs:
            streams = hc(streams, branch)
        reduce_streams(streams).pow(2).sum().backward()
        for name, p in hcs.named_parameters():
            if step == 0 and name.endswith("dynamic_scale"):
                continue  # s * tanh(norm(H) W) with W = 0: d/ds = 0 at the first step, by construction
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        opt.step()


def test_sinkhorn_stays_finite_and_row_stochastic_on_extreme_logits():
    logits = torch.tensor([[200.0, -200.0, 0.0], [-200.0, 0.0, 200.0], [0.0, -300.0, -300.0]], requires_grad=True)
    p = sinkhorn(logits, 20)
    assert torch.isfinite(p).all()
    torch.testing.assert_close(p.sum(-1), torch.ones(3), atol=1e-5, rtol=0)
    p[:, 0].sum().backward()
    assert torch.isfinite(logits.grad).all()
