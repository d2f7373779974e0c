"""Generation speed with a KV cache: decode tokens/s of a converted model vs the original.

    python bench/decode.py                  # llama-style hidden 512, 6 layers; greedy, 64 new tokens
    python bench/decode.py --static-cache   # cache_implementation="static" (fixed-size KV cache), eager
    python bench/decode.py --compile        # static cache + transformers' compiled decoding step
    python bench/decode.py --quick

``model.generate(prompt, max_new_tokens=N, min_new_tokens=N, do_sample=False)`` (KV cache on);
``tok/s`` = N / median time (prefill included, as a user sees it), original and converted
interleaved. ``ratio`` = converted tok/s / original tok/s (>= 1: no slower). ``same`` checks that
the greedy continuations are identical at initialisation (the retrofit is exact); the timed runs
then use HC parameters moved off their initial values (``perturb_hc``: dynamic projections and
scales non-zero, as after training), so every coefficient is computed from real numbers.

``--compile`` is how transformers compiles generation: with a static cache, ``generate`` runs the
prefill eagerly and every decoding step through ``torch.compile(model.__call__)`` (here with
``fullgraph=True``, Inductor, and on CPU too); ``compile_s`` is the first ``generate`` call (tracing
and compilation included) and ``compile`` its ratio to the original's. With ``--clock cpu`` it is
CPU time, the C++ compiler's included (Inductor then compiles in this process's children, one at a
time), which other jobs on a shared machine disturb far less than wall time.
"""

from __future__ import annotations

import argparse
import copy
import resource
import time

import _common as C
import torch


def perturb_hc(model, scale: float = 0.05, seed: int = 0) -> None:
    """Add seeded noise to every HC parameter (the dynamic projections start at zero; after
    training they are not), so decode times what a trained checkpoint computes."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "hyper_connections" in name:
                p.add_(torch.randn(p.shape, generator=generator).to(p.device) * scale)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_model_args(parser, batch=1)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--streams", type=int, nargs="+", default=[4])
    parser.add_argument("--variants", nargs="+", default=["static", "dynamic", "mhc"])
    parser.add_argument("--static-cache", action="store_true", help='cache_implementation="static"')
    parser.add_argument("--compile", action="store_true", help="static cache + compiled decoding step (Inductor)")
    C.add_timing_args(parser, repeats=7)
    args = parser.parse_args()
    C.apply_timing_args(args)
    if args.quick:
        args.hidden, args.layers, args.vocab, args.new_tokens, args.repeats = 128, 2, 1000, 16, 3

    device = args.device
    original = C.random_model(C.model_config(args), device=device).eval()
    # Converted copies are made from a copy that never ran generate(): with --compile, generate
    # stores its compiled call on the model, and a deep copy would inherit the original's.
    pristine = copy.deepcopy(original)
    prompt = torch.randint(3, args.vocab, (args.batch, args.prompt), device=device)
    n_new = args.new_tokens

    options: dict = {}
    if args.static_cache or args.compile:
        options["cache_implementation"] = "static"
    if args.compile:
        from transformers import CompileConfig

        C.prepare_compile()
        if args.clock == "cpu":  # compile in waited-for children, so their CPU time is counted
            import torch._inductor.config as inductor_config

            inductor_config.compile_threads = 1
        options["compile_config"] = CompileConfig(fullgraph=True, mode="default")
        options["compile_config"]._compile_all_devices = True  # transformers compiles on GPUs only by default

    def gen(model):
        @torch.inference_mode()
        def run() -> torch.Tensor:
            return model.generate(
                prompt,
                max_new_tokens=n_new,
                min_new_tokens=n_new,
                do_sample=False,
                use_cache=True,
                pad_token_id=0,
                **options,
            )

        return run

    def seconds() -> float:
        if args.clock == "cpu":  # this process and the compiler processes it waited for
            children = resource.getrusage(resource.RUSAGE_CHILDREN)
            return time.process_time() + children.ru_utime + children.ru_stime
        return time.perf_counter()

    def first_call(fn) -> tuple[torch.Tensor, float]:
        start = seconds()
        out = fn()
        return out, seconds() - start

    rows = []
    reference, base_first = first_call(gen(original))
    for variant in args.variants:
        for n in args.streams:
            model = C.converted_copy(pristine, num_streams=n, variant=variant).eval()
            tokens, first = first_call(gen(model))
            same = bool(torch.equal(tokens, reference))
            perturb_hc(model)
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
            if args.compile:
                row |= {"compile_s": first, "compile": first / base_first}
            rows.append(row)
            C.print_table([row], list(row))
    print()
    C.print_table(rows, list(rows[0]))
    name = "decode" + ("_compile" if args.compile else "_static" if args.static_cache else "")
    C.write_json(name + ("_quick" if args.quick else ""), {"settings": vars(args), "rows": rows}, args.out)


if __name__ == "__main__":
    main()
