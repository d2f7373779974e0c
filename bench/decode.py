"""Generation speed with a KV cache: decode tokens/s of a converted model vs the original.

    python bench/decode.py             # llama-style hidden 512, 6 layers; greedy, 64 new tokens
    python bench/decode.py --quick

``model.generate(prompt, max_new_tokens=N, min_new_tokens=N, do_sample=False)`` (KV cache on);
``tok/s`` = N / median wall time (prefill included, as a user sees it), original and converted
interleaved. ``ratio`` = converted tok/s / original tok/s (>= 1: no slower). ``same`` checks that
the greedy continuations are identical (the retrofit is exact).
"""

from __future__ import annotations

import argparse

import _common as C
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_model_args(parser, batch=1)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--streams", type=int, nargs="+", default=[4])
    parser.add_argument("--variants", nargs="+", default=["static", "dynamic", "mhc"])
    C.add_timing_args(parser, repeats=7)
    args = parser.parse_args()
    C.apply_timing_args(args)
    if args.quick:
        args.hidden, args.layers, args.vocab, args.new_tokens, args.repeats = 128, 2, 1000, 16, 3

    device = args.device
    original = C.random_model(C.llama_config(args.hidden, args.layers, args.vocab), device=device).eval()
    prompt = torch.randint(3, args.vocab, (args.batch, args.prompt), device=device)
    n_new = args.new_tokens

    def gen(model):
        @torch.inference_mode()
        def run() -> torch.Tensor:
            return model.generate(
                prompt, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, use_cache=True, pad_token_id=0
            )

        return run

    rows = []
    reference = gen(original)()
    for variant in args.variants:
        for n in args.streams:
            model = C.converted_copy(original, num_streams=n, variant=variant).eval()
            same = bool(torch.equal(gen(model)(), reference))
            times = C.interleaved(
                {"original": gen(original), "converted": gen(model)}, device, args.repeats, 1, args.clock
            )
            t0, t1 = C.median(times["original"]), C.median(times["converted"])
            row = {
                "variant": variant,
                "n": n,
                "orig_tok_s": args.batch * n_new / t0,
                "hc_tok_s": args.batch * n_new / t1,
                "ratio": t0 / t1,
                "same": same,
            }
            rows.append(row)
            C.print_table([row], list(row))
    print()
    C.print_table(rows, ["variant", "n", "orig_tok_s", "hc_tok_s", "ratio", "same"])
    C.write_json("decode" + ("_quick" if args.quick else ""), {"settings": vars(args), "rows": rows}, args.out)


if __name__ == "__main__":
    main()
