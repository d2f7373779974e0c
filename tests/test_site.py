"""The per-site API of site.py: ``x, ctx = site.width_connection(H)``, ``H' = site.depth_connection(ctx, y)``,
and the pieces a patched layer uses (``mix``, ``outer``, ``delta``, ``depth_around``, ``made_of``)."""

import pytest
import torch

from hc_retrofit import HCConfig, HyperConnection

SETTINGS = {
    "static": {"variant": "static"},
    "dynamic": {"variant": "dynamic", "dynamic_scale_init": 0.5},
    "mhc": {"variant": "mhc", "dynamic_scale_init": 0.5},
}


def site(kind: str, site_index: int = 1) -> HyperConnection:
    torch.manual_seed(0)
    hc = HyperConnection(8, HCConfig(num_streams=4, **SETTINGS[kind]), site_index=site_index)
    with torch.no_grad():
        for p in hc.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return hc


@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("kind", list(SETTINGS))
def test_pieces_add_up_to_the_depth_connection(kind, grad):
    hc, branch = site(kind), torch.nn.Linear(8, 8)
    h = torch.randn(2, 3, 4, 8)
    with torch.set_grad_enabled(grad):
        x, ctx = hc.width_connection(h)
        y = branch(x)
        full = hc.depth_connection(ctx, y)
        torch.testing.assert_close(hc.mix(ctx) + hc.outer(ctx, y), full)
        _, ctx_delta = hc.width_connection(h, adds_input=True)
        torch.testing.assert_close(h + hc.delta(ctx_delta, y), full)
        torch.testing.assert_close(h + 2.0 * hc.delta(ctx_delta, y, 2.0), hc.mix(ctx) + 2.0 * hc.outer(ctx, y))
        out = y + x  # a whole layer as the branch: F(x) = out - x = y
        torch.testing.assert_close(hc.depth_around(ctx, out), full, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(hc(h, branch), full)


@pytest.mark.parametrize("kind", list(SETTINGS))
def test_made_of_recomputes_the_streams_with_the_same_gradients(kind):
    first, second, branch = site(kind, 0), site(kind, 1), torch.nn.Linear(8, 8)
    h0 = torch.randn(2, 3, 4, 8, requires_grad=True)

    def run(recompute: bool):
        x0, ctx0 = first.width_connection(h0)
        y0 = branch(x0)
        h1 = first.mix(ctx0) + first.outer(ctx0, y0)
        x1, ctx1 = second.width_connection(h1, adds_input=True, made_of=(ctx0, y0) if recompute else None)
        assert (ctx1.source is not None) == recompute
        out = h1 + second.delta(ctx1, branch(x1))
        params = [h0, *first.parameters(), *second.parameters(), *branch.parameters()]
        return out, torch.autograd.grad(out.square().sum(), params)

    out, grads = run(True)
    ref_out, ref_grads = run(False)
    torch.testing.assert_close(out, ref_out)
    for g, ref in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, ref, atol=1e-6, rtol=1e-5)
