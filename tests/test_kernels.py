"""The fast autograd Functions (kernels.py, sinkhorn_knopp.py) against the formulas of formulas.py (float64).

Each fast path (static and per-token coefficients, contiguous and stride-0 "expanded" streams,
broadcast ``y``) must give the same values as the textbook formula and pass ``gradcheck``.
"""

import importlib.util

import pytest
import torch

from hc_retrofit import (
    HCConfig,
    HyperConnection,
    depth_connection,
    expand_streams,
    sinkhorn,
    stream_mix,
    width_connection,
)
from hc_retrofit.connections import outer_streams, rms_project
from hc_retrofit.modeling import formulas, kernels, sinkhorn_knopp
from hc_retrofit.modeling.kernels import DepthConnection, DepthWidth, Recomputed, WidthPass
from hc_retrofit.modeling.projection import ProjectPass
from hc_retrofit.modeling.sinkhorn_knopp import sinkhorn_op

F64 = {"dtype": torch.float64}


ref_width = formulas.width
ref_mix = formulas.mix
ref_depth = formulas.depth
ref_rms_project = formulas.rms_project


def streams_of(kind: str, lead=(2, 3), n=3, d=5):
    """Contiguous streams, or n stride-0 views of one tensor (what layer 0 receives)."""
    if kind == "expanded":
        return expand_streams(torch.randn(*lead, d, **F64), n).requires_grad_(False)
    return torch.randn(*lead, n, d, **F64)


def leaf(t):
    return t.detach().requires_grad_(True) if t.stride(-2) != 0 else t


@pytest.mark.parametrize("kind", ["contiguous", "expanded"])
@pytest.mark.parametrize("per_token", [False, True])
def test_width_connection_matches_einsum_and_gradchecks(kind, per_token):
    torch.manual_seed(0)
    h = streams_of(kind)
    a = torch.randn(*((2, 3) if per_token else ()), 3, **F64, requires_grad=True)
    if kind == "expanded":  # differentiate through the expand, as layer 0 does
        base = torch.randn(2, 3, 5, **F64, requires_grad=True)
        torch.testing.assert_close(width_connection(expand_streams(base, 3), a), ref_width(expand_streams(base, 3), a))
        assert torch.autograd.gradcheck(lambda t, c: width_connection(expand_streams(t, 3), c), (base, a))
    else:
        h.requires_grad_(True)
        torch.testing.assert_close(width_connection(h, a), ref_width(h, a))
        assert torch.autograd.gradcheck(width_connection, (h, a))


@pytest.mark.parametrize("kind", ["contiguous", "expanded"])
@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("with_y", [False, True])
def test_depth_connection_and_stream_mix_match_einsum_and_gradcheck(kind, per_token, with_y):
    torch.manual_seed(1)
    lead = (2, 3) if per_token else ()
    r = torch.randn(*lead, 3, 3, **F64, requires_grad=True)
    b = torch.randn(*lead, 3, **F64, requires_grad=True)
    y = torch.randn(2, 3, 5, **F64, requires_grad=True)
    base = torch.randn(2, 3, 5, **F64, requires_grad=True)
    full = torch.randn(2, 3, 3, 5, **F64, requires_grad=True)

    def streams(t):
        return expand_streams(t, 3) if kind == "expanded" else t

    src = base if kind == "expanded" else full
    if with_y:
        torch.testing.assert_close(depth_connection(streams(src), r, b, y), ref_depth(streams(src), r, b, y))
        fn = lambda s, r_, b_, y_: depth_connection(streams(s), r_, b_, y_)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (src, r, b, y))
    else:
        torch.testing.assert_close(stream_mix(streams(src), r), ref_mix(streams(src), r))
        assert torch.autograd.gradcheck(lambda s, r_: stream_mix(streams(s), r_), (src, r))


@pytest.mark.parametrize("kind", ["contiguous", "expanded"])
@pytest.mark.parametrize("per_token", [False, True])
def test_width_pass_is_the_width_connection_and_the_identity(kind, per_token):
    torch.manual_seed(5)
    a = torch.randn(*((2, 3) if per_token else ()), 3, **F64, requires_grad=True)
    src = torch.randn(*((2, 3, 5) if kind == "expanded" else (2, 3, 3, 5)), **F64, requires_grad=True)

    def streams(t):
        return expand_streams(t, 3) if kind == "expanded" else t

    def fast(s, a_):
        x, passed = WidthPass.apply(streams(s), a_)
        return x, passed * 1.5  # the pass-through is read downstream, so both gradients meet

    x, passed = fast(src, a)
    torch.testing.assert_close(x, ref_width(streams(src), a))
    torch.testing.assert_close(passed, 1.5 * streams(src))
    assert torch.autograd.gradcheck(fast, (src, a))
    assert torch.autograd.gradcheck(lambda s, a_: fast(s, a_)[0], (src, a))  # pass-through unused
    assert torch.autograd.gradcheck(lambda s, a_: fast(s, a_)[1], (src, a))  # x unused


@pytest.mark.parametrize("kind", ["contiguous", "expanded"])
@pytest.mark.parametrize("per_token", [False, True])
def test_depth_width_is_the_depth_then_the_next_width_connection(kind, per_token):
    torch.manual_seed(6)
    lead = (2, 3) if per_token else ()
    r = torch.randn(*lead, 3, 3, **F64, requires_grad=True)
    b = torch.randn(*lead, 3, **F64, requires_grad=True)
    a = torch.randn(*lead, 3, **F64, requires_grad=True)
    y = torch.randn(2, 3, 5, **F64, requires_grad=True)
    src = torch.randn(*((2, 3, 5) if kind == "expanded" else (2, 3, 3, 5)), **F64, requires_grad=True)

    def streams(t):
        return expand_streams(t, 3) if kind == "expanded" else t

    def fast(s, r_, b_, y_, a_):
        return DepthWidth.apply(streams(s), r_, b_, y_, a_)

    new, x = fast(src, r, b, y, a)
    ref_new = ref_depth(streams(src), r, b, y)
    torch.testing.assert_close(new, ref_new)
    torch.testing.assert_close(x, ref_width(ref_new, a))
    args = (src, r, b, y, a)
    assert torch.autograd.gradcheck(fast, args)
    assert torch.autograd.gradcheck(lambda *t: fast(*t)[0], args)  # x unused
    assert torch.autograd.gradcheck(lambda *t: fast(*t)[1], args)  # H' unused


@pytest.mark.parametrize("kind", ["contiguous", "expanded"])
@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("shared", [False, True])
def test_functions_on_recomputed_streams_gradcheck(monkeypatch, kind, per_token, shared):
    """A second site's Functions save ``(H0, R0, b0, y0)`` instead of ``H1 = R0 H0 + b0 (x) y0``:
    shared by several, ``H1`` is recomputed once in backward; a sole consumer takes its dot
    products with ``H0`` and ``y0`` instead and recomputes nothing."""
    recomputed = []
    monkeypatch.setattr(kernels, "mid_layer_streams", lambda *t: recomputed.append(1) or kernels._depth(*t))
    torch.manual_seed(9)
    lead = (2, 3) if per_token else ()
    r0, r = (torch.randn(*lead, 3, 3, **F64, requires_grad=True) for _ in range(2))
    b0, b, a = (torch.randn(*lead, 3, **F64, requires_grad=True) for _ in range(3))
    y0, y = (torch.randn(2, 3, 5, **F64, requires_grad=True) for _ in range(2))
    src = torch.randn(*((2, 3, 5) if kind == "expanded" else (2, 3, 3, 5)), **F64, requires_grad=True)

    def streams(t):
        return expand_streams(t, 3) if kind == "expanded" else t

    def fast(s, r0_, b0_, y0_, r_, b_, y_, a_):
        source = (Recomputed(), (streams(s), r0_, b0_, y0_))
        h1 = ref_depth(streams(s), r0_, b0_, y0_)
        if not shared:
            return DepthConnection.apply(h1, r_, b_, y_, source)
        x, h1 = WidthPass.apply(h1, a_, source)
        return DepthConnection.apply(h1, r_, b_, y_, source), x

    def ref(s, r0_, b0_, y0_, r_, b_, y_, a_):
        h1 = ref_depth(streams(s), r0_, b0_, y0_)
        return ref_depth(h1, r_, b_, y_), ref_width(h1, a_)

    args = (src, r0, b0, y0, r, b, y, a)
    out, expected = fast(*args), ref(*args)
    torch.testing.assert_close(out, expected if shared else expected[0])
    recomputed.clear()
    (out[0] if shared else out).sum().backward()
    assert len(recomputed) == (1 if shared else 0)
    assert torch.autograd.gradcheck(fast, args)


@pytest.mark.parametrize("per_token", [False, True])  # dynamic HC (per stream) / mHC (vec H per token)
@pytest.mark.parametrize("recomputed", [False, True])
def test_project_pass_is_the_projection_and_the_identity(per_token, recomputed):
    torch.manual_seed(10)
    src = torch.randn(2, 3, 4, 6, **F64, requires_grad=True)
    r0 = torch.randn(4, 4, **F64, requires_grad=True)
    b0 = torch.randn(4, **F64, requires_grad=True)
    y0 = torch.randn(2, 3, 6, **F64, requires_grad=True)
    w = torch.randn(24 if per_token else 6, 5, **F64, requires_grad=True)

    def streams(s, r0_, b0_, y0_):
        return (ref_depth(s, r0_, b0_, y0_) if recomputed else s).flatten(-2 if per_token else -1)

    def fast(s, r0_, b0_, y0_, w_):
        source = (Recomputed(), (s, r0_, b0_, y0_)) if recomputed else None
        p, passed = ProjectPass.apply(streams(s, r0_, b0_, y0_), w_, source)
        return p, passed * 1.5  # the pass-through is read downstream, so both gradients meet

    args = (src, r0, b0, y0, w)
    p, passed = fast(*args)
    torch.testing.assert_close(p, ref_rms_project(streams(*args[:4]), w))
    torch.testing.assert_close(passed, 1.5 * streams(*args[:4]))
    assert torch.autograd.gradcheck(fast, args)
    assert torch.autograd.gradcheck(lambda *t: fast(*t)[0], args)  # pass-through unused
    assert torch.autograd.gradcheck(lambda *t: fast(*t)[1], args)  # projection unused


def test_project_pass_of_bfloat16_streams_matches_float32():
    torch.manual_seed(11)
    x = torch.randn(2, 3, 4, 16)
    w, g_p, g_pass = torch.randn(16, 6), torch.randn(2, 3, 4, 6), torch.randn(2, 3, 4, 16)
    grads = []
    for dtype in (torch.float32, torch.bfloat16):
        leaf = x.to(dtype).detach().requires_grad_(True)
        p, passed = ProjectPass.apply(leaf, w)
        assert p.dtype == torch.float32 and passed.dtype == dtype
        torch.autograd.backward((p, passed), (g_p, g_pass.to(dtype)))
        grads.append(leaf.grad.float())
    torch.testing.assert_close(grads[1], grads[0], atol=0.05, rtol=0.02)


def test_broadcast_y_and_unbatched_streams():
    torch.manual_seed(2)
    h = torch.randn(3, 4, **F64, requires_grad=True)  # (n, D): no token dims
    r = torch.randn(3, 3, **F64, requires_grad=True)
    b = torch.randn(3, **F64, requires_grad=True)
    y = torch.randn(4, **F64, requires_grad=True)
    torch.testing.assert_close(depth_connection(h, r, b, y), ref_depth(h, r, b, y))
    assert torch.autograd.gradcheck(depth_connection, (h, r, b, y))


@pytest.mark.parametrize("shape", [(2, 3, 4, 6), (5, 7)])
def test_rms_project_matches_norm_then_matmul_and_gradchecks(shape):
    torch.manual_seed(3)
    x = torch.randn(*shape, **F64, requires_grad=True)
    w = torch.randn(shape[-1], 5, **F64, requires_grad=True)
    torch.testing.assert_close(rms_project(x, w), ref_rms_project(x, w))
    assert torch.autograd.gradcheck(rms_project, (x, w))
    # float32 (what the module runs) agrees with the float64 reference
    x32, w32 = x.detach().float(), w.detach().float()
    torch.testing.assert_close(rms_project(x32, w32), ref_rms_project(x, w).float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["static", "dynamic", "mhc"])
def test_block_gradients_match_einsum_reference(variant):
    """A whole HC block: the fast Functions give the same gradients as the einsum formulation."""
    torch.manual_seed(4)
    hc = HyperConnection(8, HCConfig(num_streams=4, variant=variant, dynamic_scale_init=0.5), site_index=1)
    with torch.no_grad():
        for p in hc.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    branch = torch.nn.Linear(8, 8)
    h = torch.randn(2, 3, 4, 8, requires_grad=True)

    def run(fast: bool):
        c = hc.coefficients(h)
        if fast:
            return depth_connection(h, c.r, c.b, branch(width_connection(h, c.a)))
        return ref_depth(h, c.r, c.b, branch(ref_width(h, c.a)))

    params = [h, *hc.parameters(), *branch.parameters()]
    fast = torch.autograd.grad(run(True).square().sum(), params)
    ref = torch.autograd.grad(run(False).square().sum(), params)
    for f, r in zip(fast, ref, strict=True):
        torch.testing.assert_close(f, r, atol=1e-5, rtol=1e-4)


def test_bf16_streams_keep_float32_coefficient_grads():
    torch.manual_seed(5)
    h = torch.randn(2, 3, 4, 8, dtype=torch.bfloat16, requires_grad=True)
    r = torch.randn(4, 4, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    a = torch.randn(4, requires_grad=True)
    y = torch.randn(2, 3, 8, dtype=torch.bfloat16, requires_grad=True)
    out = depth_connection(h, r, b, y) + width_connection(h, a).unsqueeze(-2)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert r.grad.dtype == b.grad.dtype == a.grad.dtype == torch.float32
    assert h.grad.dtype == y.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("per_token", [False, True])
def test_outer_streams_matches_broadcast_and_gradchecks(per_token):
    torch.manual_seed(6)
    b = torch.randn(*((2, 3) if per_token else ()), 4, **F64, requires_grad=True)
    y = torch.randn(2, 3, 5, **F64, requires_grad=True)
    torch.testing.assert_close(outer_streams(b, y), b.unsqueeze(-1) * y.unsqueeze(-2))
    assert torch.autograd.gradcheck(outer_streams, (b, y))


@pytest.mark.parametrize("iters", [1, 3, 20])
def test_sinkhorn_matches_log_domain_reference_and_its_gradient(iters):
    def reference(logits):
        return formulas.sinkhorn(logits, iters)

    torch.manual_seed(7)
    logits = (torch.randn(2, 3, 4, 4, **F64) * 3).requires_grad_(True)
    torch.testing.assert_close(sinkhorn(logits, iters), reference(logits))
    g = torch.randn(2, 3, 4, 4, **F64)
    torch.testing.assert_close(
        torch.autograd.grad(sinkhorn(logits, iters), logits, g)[0],
        torch.autograd.grad(reference(logits), logits, g)[0],
    )
    assert torch.autograd.gradcheck(lambda t: sinkhorn(t, iters), (logits,))


def test_sinkhorn_operator_passes_opcheck():
    # Fake (meta) kernel, autograd registration and schema agree with the real kernel.
    torch.manual_seed(8)
    logits = (torch.randn(2, 3, 4, 4) * 3).requires_grad_(True)
    torch.library.opcheck(sinkhorn_op, (logits, 5))
    torch.library.opcheck(sinkhorn_op, (torch.randn(4, 4, dtype=torch.float64, requires_grad=True), 2))


def test_sinkhorn_module_imported_twice_reuses_the_operator(tmp_path, monkeypatch):
    # The package and a checkpoint's copy of this file (remote code) may both load in one process.
    from hc_retrofit.remote_code import package_module_closure

    copied = tmp_path / "remote_copy_of_hc_retrofit"  # as transformers imports it: a package of the copies
    copied.mkdir()
    (copied / "__init__.py").write_text("")
    for name, source in package_module_closure().items():
        (copied / name).write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    copy = importlib.import_module("remote_copy_of_hc_retrofit.sinkhorn_knopp")
    assert copy.sinkhorn_op is sinkhorn_op and copy.sinkhorn_backward_op is sinkhorn_knopp.sinkhorn_backward_op
    logits = torch.randn(3, 4, 4, requires_grad=True)
    torch.testing.assert_close(copy.sinkhorn(logits, 4), sinkhorn(logits, 4))


def test_sinkhorn_in_a_compiled_graph_without_autograd_matches_the_formula():
    # What a compiled decoding step runs (Inductor, C++ here): the exp-domain iterations as one
    # nested region, compiled once and called at both sites; also for many matrices (a compiled
    # server's batch); row-stochastic as exactness needs.
    torch._dynamo.reset()
    torch.manual_seed(9)
    few, many = torch.randn(2, 1, 4, 4) * 3, torch.randn(3, 40, 4, 4) * 3

    @torch.compile(fullgraph=True)
    def sites(t: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return sinkhorn(t, 20), sinkhorn(t.flip(-1), 20), sinkhorn(u, 20)

    with torch.inference_mode():
        outs = sites(few, many)
    for out, t in zip(outs, (few, few.flip(-1), many), strict=True):
        torch.testing.assert_close(out, formulas.sinkhorn(t.double(), 20).float(), rtol=0, atol=1e-6)
        torch.testing.assert_close(out.sum(-1), torch.ones(t.shape[:-1]), rtol=0, atol=1e-6)


def _compiled_graph_targets(fn, *args) -> list[str]:
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(fn, backend=backend, fullgraph=True)(*args)
    return [str(node.target) for gm in graphs for node in gm.graph.nodes if node.op == "call_function"]


def test_sinkhorn_switch_eager_keeps_the_operator_in_compiled_graphs(monkeypatch):
    def two_sites(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # (one call site is inlined)
        return sinkhorn(t, 20), sinkhorn(t * 2, 20)

    logits = torch.randn(100, 4, 4)  # many matrices: the region too (a compiled server's batch)
    monkeypatch.setattr(
        sinkhorn_knopp, "_compiled_region", sinkhorn_knopp._nested_region(sinkhorn_knopp._exp_domain, "auto")
    )
    targets = _compiled_graph_targets(two_sites, logits)
    assert sum("invoke_subgraph" in t for t in targets) == 2 and not any("sinkhorn" in t for t in targets)
    region = sinkhorn_knopp._nested_region(sinkhorn_knopp._exp_domain, "eager")
    assert region is None
    monkeypatch.setattr(sinkhorn_knopp, "_compiled_region", region)
    targets = _compiled_graph_targets(two_sites, logits)
    assert sum("hc_retrofit.sinkhorn_v1" in t for t in targets) == 2 and not any(
        "invoke_subgraph" in t for t in targets
    )


@pytest.mark.parametrize(("value", "switch"), [(None, "auto"), ("eager", "eager"), (" Eager ", "eager"), ("", "auto")])
def test_sinkhorn_switch_is_read_from_the_environment(monkeypatch, value, switch):
    if value is None:
        monkeypatch.delenv(sinkhorn_knopp.SWITCH, raising=False)
    else:
        monkeypatch.setenv(sinkhorn_knopp.SWITCH, value)
    assert sinkhorn_knopp._switch() == switch


def test_sinkhorn_switch_with_an_unknown_value_warns_and_means_auto(monkeypatch):
    monkeypatch.setenv(sinkhorn_knopp.SWITCH, "compiled")
    with pytest.warns(UserWarning, match="HC_RETROFIT_SINKHORN='compiled' is neither auto nor eager; using auto"):
        assert sinkhorn_knopp._switch() == "auto"
