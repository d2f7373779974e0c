"""Work of the HC operations, counted: elements read and written per token, and operator calls.

    python bench/work.py                 # width 512, 2 x 256 tokens, n = 4, every variant
    python bench/work.py --streams 2 4 8 --width 1024
    python bench/work.py --quick

Machine independent: no timing. The middle layer of a 3-layer llama-style model (as in
``bench/layer.py``) runs forward and backward under a counting dispatch mode (``_work.py``: every
aten operator's distinct elements read and written, views free), converted and original on the
same inputs; the HC work is the difference. It is printed per token, in units of the width ``D``
(so ``n D`` is one pass over a token's streams), beside the physical minimum:

* forward, per site: read the streams ``H`` once and the branch output ``y``; write the new
  streams ``H'`` and the next branch input ``x`` (the depth connection of one site fused with the
  width connection of the next). The original's residual add reads ``h, y`` and writes ``h'``, so
  HC's extra minimum is ``(n - 1) D`` read and ``n D`` written per site.
* backward, per site: read ``dH'`` and ``H`` (for the coefficients' gradients), write ``dH``; the
  original's ``dh = dh' + dx`` reads ``2 D`` and writes ``D``: extra ``2 n D`` read, ``n D`` written.

``calls``: operators dispatched per layer beyond the original's (forward + backward), and
``decode``: the same for one cached decoding step (batch 1, no grad) per layer, the per-token
dispatch cost that dominates batch-1 generation, and ``decode_py`` the Python and builtin
function calls that step makes per layer beyond the original's (hooks, site code, views). ``saved``: elements per token autograd keeps
for backward beyond the original's (``_common.saved_activation_bytes``), in units of ``D``.
"""

from __future__ import annotations

import argparse
import copy
import sys

import _common as C
import torch
from _work import Work, WorkCounter
from layer import layer_inputs

import hc_retrofit
from hc_retrofit.modeling.patch import decoder_layers


def layer_work(layer, hidden: torch.Tensor, kwargs: dict, grad: torch.Tensor) -> tuple[Work, Work, int]:
    """Forward and backward work of one call of ``layer``, and the bytes autograd saved."""
    layer.zero_grad(set_to_none=True)  # (a second backward would add into existing gradients)
    x = hidden.detach().requires_grad_(True)
    params = list(layer.parameters())
    with C.saved_activation_bytes(exclude=params) as saved, WorkCounter() as fwd:
        out = layer(x, **kwargs)
    out = out[0] if isinstance(out, tuple) else out
    with WorkCounter() as bwd:
        out.backward(grad)
    return fwd.work, bwd.work, saved["bytes"]


def decode_calls(model, prompt: torch.Tensor) -> tuple[int, int]:
    """Operators dispatched, and Python and builtin function calls made, by one cached decoding
    step (batch 1, no grad): the two things a token pays for at batch 1."""
    with torch.no_grad():
        past = model(input_ids=prompt, use_cache=True).past_key_values
        step = prompt[:, -1:]
        model(input_ids=step, past_key_values=past, use_cache=True)  # (first-call caches filled)
        with WorkCounter() as counter:
            model(input_ids=step, past_key_values=past, use_cache=True)
        calls = 0

        def count(frame, event: str, arg) -> None:
            nonlocal calls
            calls += event in ("call", "c_call")

        sys.setprofile(count)
        try:
            model(input_ids=step, past_key_values=past, use_cache=True)
        finally:
            sys.setprofile(None)
    return counter.work.calls, calls


def minimum(n: int, sites: int) -> dict[str, int]:
    """HC's extra elements per token, in units of D, at the physical minimum (module docstring)."""
    return {"fwd_r": (n - 1) * sites, "fwd_w": n * sites, "bwd_r": 2 * n * sites, "bwd_w": n * sites}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--streams", type=int, nargs="+", default=[4])
    parser.add_argument("--variants", nargs="+", default=["static", "dynamic", "mhc"])
    parser.add_argument("--top", type=int, default=0, help="also list the N operators that moved most")
    parser.add_argument("--quick", action="store_true", help="width 128, 64 tokens")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/work.json)")
    args = parser.parse_args()
    if args.quick:
        args.width, args.seq = 128, 32

    d = args.width
    config = C.llama_config(d, layers=3, vocab=512, heads=max(1, d // 64), kv_heads=max(1, d // 64))
    original = C.random_model(config).train()
    ids = torch.randint(3, 512, (args.batch, args.seq))
    tokens = args.batch * args.seq
    base_args, base_kwargs = layer_inputs(original, ids)
    base_layer = decoder_layers(original)[1]
    base_decode = decode_calls(original.eval(), ids[:1, :8])
    original.train()
    print(f"llama layer, width={d} tokens={args.batch}x{args.seq}; HC work per token in units of D = {d}")
    rows = []
    for n in args.streams:
        torch.manual_seed(1)
        g = torch.randn(args.batch, args.seq, n, d)
        base_f, base_b, base_saved = layer_work(base_layer, base_args[0], base_kwargs, g.mean(-2))
        for variant in args.variants:
            model = hc_retrofit.convert(copy.deepcopy(original), hc_retrofit.HCConfig(num_streams=n, variant=variant))
            model.train()
            hc_args, hc_kwargs = layer_inputs(model, ids)
            streams = hc_args[0] + 0.1 * torch.randn(hc_args[0].shape)  # streams that differ
            layer = decoder_layers(model)[1]
            fwd, bwd, saved = layer_work(layer, streams, hc_kwargs, g)
            fwd, bwd = fwd - base_f, bwd - base_b
            sites = len(layer.hyper_connections)
            low = minimum(n, sites)
            per = tokens * d
            row = {
                "variant": variant,
                "n": n,
                "fwd_r": fwd.read / per,
                "fwd_w": fwd.written / per,
                "bwd_r": bwd.read / per,
                "bwd_w": bwd.written / per,
                "total": (fwd.moved + bwd.moved) / per,
                "minimum": float(sum(low.values())),
            }
            row["x_min"] = row["total"] / row["minimum"]
            row["saved"] = (saved - base_saved) / 4 / per
            row["calls"] = fwd.calls + bwd.calls
            ops, py = decode_calls(model.eval(), ids[:1, :8])
            row["decode"] = (ops - base_decode[0]) / config.num_hidden_layers
            row["decode_py"] = (py - base_decode[1]) / config.num_hidden_layers
            rows.append(row)
            if args.top:
                print(f"{variant} n={n}: most traffic (per token, units of D)")
                for op, moved in (fwd.by_op + bwd.by_op).most_common(args.top):
                    print(f"  {op:<28}{moved / per:8.1f}")
            del model
    columns = list(rows[0])
    C.print_table(rows, columns)
    C.write_json("work" + ("_quick" if args.quick else ""), {"settings": vars(args), "rows": rows}, args.out)


if __name__ == "__main__":
    main()
