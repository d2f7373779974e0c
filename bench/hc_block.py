"""One hyper-connection block alone: ours vs lucidrains' ``hyper-connections`` (0.4.11), fwd+bwd.

    pip install --no-deps hyper-connections==0.4.11 torch-einops-utils   # keeps your torch
    python bench/hc_block.py            # shapes (B, T, D) x n, fwd+bwd of one block
    python bench/hc_block.py --quick

Each contender runs ``H -> block(H, branch)`` and backward on the same values (ours as
``(B, T, n, D)`` streams; lucidrains' folds streams into the batch, ``(B n, T, D)``), with the
same cheap branch (``tanh``), so the time is the hyper-connection work itself: coefficients,
width and depth connections. Pairs:

* ``dynamic``: our dynamic HC vs ``HyperConnections`` (lucidrains' HC is always dynamic, DHC).
* ``mhc``: our mHC (input-dependent, 20 Sinkhorn iterations) vs ``ManifoldConstrainedHyperConnections``
  (same iterations).
* ``static``: our static HC vs ``HyperConnections`` (their cheapest HC).

``ratio`` = our median / theirs (< 1: ours faster); times are interleaved after warm-up.
"""

from __future__ import annotations

import argparse

import _common as C
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["4x256x512", "4x256x1024", "1x1024x2048"], help="BxTxD")
    parser.add_argument("--streams", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--pairs", nargs="+", default=["static", "dynamic", "mhc"])
    C.add_timing_args(parser, repeats=15)
    args = parser.parse_args()
    C.apply_timing_args(args)
    if args.quick:
        args.shapes, args.streams, args.repeats = ["2x64x256"], [4], 5
    try:
        from hyper_connections import HyperConnections, ManifoldConstrainedHyperConnections
    except ImportError as err:
        raise SystemExit(
            "needs lucidrains' package: pip install --no-deps hyper-connections==0.4.11 torch-einops-utils"
        ) from err
    from hc_retrofit import HCConfig, HyperConnection

    device = args.device
    rows = []
    for shape in args.shapes:
        b, t, d = map(int, shape.split("x"))
        for n in args.streams:
            torch.manual_seed(0)
            h = torch.randn(b, t, n, d, device=device)
            ours_in = h.clone().requires_grad_(True)
            theirs_in = h.permute(0, 2, 1, 3).reshape(b * n, t, d).clone().requires_grad_(True)
            for pair in args.pairs:
                ours = HyperConnection(d, HCConfig(num_streams=n, variant=pair), site_index=1).to(device)
                if pair == "mhc":
                    theirs = ManifoldConstrainedHyperConnections(n, dim=d, layer_index=1, sinkhorn_iters=20)
                else:
                    theirs = HyperConnections(n, dim=d, layer_index=1)
                theirs = theirs.to(device)

                def run_ours(ours=ours, ours_in=ours_in) -> None:
                    ours_in.grad = None
                    ours(ours_in, torch.tanh).sum().backward()

                def run_theirs(theirs=theirs, theirs_in=theirs_in) -> None:
                    theirs_in.grad = None
                    x, add_residual = theirs(theirs_in)
                    add_residual(torch.tanh(x)).sum().backward()

                times = C.interleaved(
                    {"ours": run_ours, "theirs": run_theirs}, device, args.repeats, warmup=2, clock=args.clock
                )
                t_ours, t_theirs = C.median(times["ours"]), C.median(times["theirs"])
                row = {
                    "shape": shape,
                    "n": n,
                    "pair": pair,
                    "ours_ms": 1e3 * t_ours,
                    "theirs_ms": 1e3 * t_theirs,
                    "ratio": t_ours / t_theirs,
                }
                rows.append(row)
                C.print_table([row], list(row))
    print()
    C.print_table(rows, ["shape", "n", "pair", "ours_ms", "theirs_ms", "ratio"])
    print(f"ours faster on {sum(r['ratio'] < 1 for r in rows)}/{len(rows)}")
    C.write_json("hc_block" + ("_quick" if args.quick else ""), {"settings": vars(args), "rows": rows}, args.out)


if __name__ == "__main__":
    main()
