"""The equations of formulas.py on hand-computed cases: the reference the fast paths are checked against."""

import torch

from hc_retrofit.modeling import formulas


def test_width_mix_outer_depth_by_hand():
    h = torch.tensor([[1.0, 2.0], [10.0, 20.0]])  # n = 2 streams of width 2
    a = torch.tensor([0.25, 0.75])
    torch.testing.assert_close(formulas.width(h, a), torch.tensor([7.75, 15.5]))
    r = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # row j = output stream: a swap
    torch.testing.assert_close(formulas.mix(h, r), torch.tensor([[10.0, 20.0], [1.0, 2.0]]))
    b, y = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])
    torch.testing.assert_close(formulas.outer(b, y), torch.tensor([[3.0, 4.0], [6.0, 8.0]]))
    torch.testing.assert_close(formulas.depth(h, r, b, y), torch.tensor([[13.0, 24.0], [7.0, 10.0]]))


def test_width_and_mix_with_per_token_coefficients_are_each_tokens_products():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)  # (B, T, n, D)
    a = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    r = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    x, mixed = formulas.width(h, a), formulas.mix(h, r)
    assert x.shape == (2, 3, 5) and mixed.shape == (2, 3, 4, 5)
    for i in range(2):
        for t in range(3):
            torch.testing.assert_close(x[i, t], a[i, t] @ h[i, t])
            torch.testing.assert_close(mixed[i, t], r[i, t] @ h[i, t])
    torch.testing.assert_close(formulas.mix(h, r[0, 0]), r[0, 0] @ h)  # static R over every token


def test_rms_project_is_a_weightless_rms_norm_then_matmul():
    x = torch.tensor([[3.0, 4.0]])  # rms = sqrt(12.5)
    w = torch.eye(2)
    torch.testing.assert_close(formulas.rms_project(x, w), x / 12.5**0.5, atol=1e-6, rtol=1e-5)
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 4, 8, generator=g, dtype=torch.float64), torch.randn(8, 6, generator=g, dtype=torch.float64)
    by_hand = (x / (x.pow(2).mean(-1, keepdim=True) + formulas.EPS).sqrt()) @ w
    torch.testing.assert_close(formulas.rms_project(x, w), by_hand)


def test_sinkhorn_is_row_stochastic_and_keeps_a_doubly_stochastic_matrix():
    logits = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(0)) * 2  # (some draws converge slower)
    p = formulas.sinkhorn(logits, 30)
    torch.testing.assert_close(p.sum(-1), torch.ones(3, 4))
    torch.testing.assert_close(p.sum(-2), torch.ones(3, 4), atol=1e-3, rtol=0)
    fixed = torch.full((4, 4), 0.1) + 0.6 * torch.eye(4)  # already doubly stochastic: unchanged
    torch.testing.assert_close(formulas.sinkhorn(fixed.log(), 1), fixed)


def test_dynamic_hc_layout_puts_column_k_of_r_on_stream_k():
    n, d = 3, 4
    a, r, b = torch.zeros(n), torch.zeros(n, n), torch.zeros(n)
    base, s = formulas.hc_layout(a, r, b, torch.ones(3))
    w = torch.zeros(d, n + 2)
    w[0, 1 : n + 1] = 10.0  # feature 0 of stream k drives R_.k (and nothing else)
    h = torch.zeros(n, d)
    h[1, 0] = 1.0  # only stream 1 has feature 0
    a_t, r_t, b_t = formulas.hc_dynamic(base, s, w, h)
    assert a_t.abs().max() == 0 and b_t.abs().max() == 0
    assert (r_t[:, 1] > 0.99).all() and r_t[:, [0, 2]].abs().max() == 0


def test_mhc_at_zero_logits_and_its_layout():
    n = 4
    base, s = formulas.mhc_layout(torch.zeros(n), torch.zeros(n, n), torch.zeros(n), torch.tensor([1.0, 2.0, 3.0]))
    assert base.shape == (2 * n + n * n,) and s.tolist() == [1.0] * n + [3.0] * n + [2.0] * (n * n)
    a, r, b = formulas.mhc(base, n, 5)
    torch.testing.assert_close(a, torch.full((n,), 0.5))
    torch.testing.assert_close(r, torch.full((n, n), 1 / n))
    torch.testing.assert_close(b, torch.ones(n))
