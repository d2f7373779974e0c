"""Training-step cost of a converted model vs the original: forward+backward time and memory.

    python bench/train_step.py            # llama-style, hidden 512, 6 layers, seq 256, batch 4
    python bench/train_step.py --quick    # smoke run (small model, few repeats)
    python bench/train_step.py --device cuda

For every variant (static, dynamic, mHC) and stream count n (2, 4, 8) the script converts a deep
copy of one random llama-style model and measures, in the same run and on the same inputs:

* ``time``: median wall time of ``loss = model(ids, labels=ids).loss; loss.backward()`` divided by
  the original's median; the two models alternate step by step after a warm-up.
* ``act``: bytes of the tensors autograd saves for backward in one forward (each storage once,
  parameters excluded; see ``_common.saved_activation_bytes``), divided by the original's. This
  is the activation memory of a step: deterministic and device independent.
* ``peak``: (parameters + gradients + saved activations) of the converted model divided by the
  same for the original: the memory a training step needs at its peak (end of the forward pass),
  optimizer state excluded. On CUDA ``cuda_peak`` adds ``torch.cuda.max_memory_allocated``.
* ``max|dlogit|``: the exactness check (fp32 logits, converted vs original).
* with ``--compile`` (both models' decoder layers ``torch.compile``'d in place, Inductor: the regional
  compilation of ``hc-retrofit train --compile``): ``compile_s``, the wall time of
  the converted model's first step (tracing + compilation), and ``compile``, its ratio to the
  original's first step.

``--vocab 512`` keeps the LM head and loss a small share of the step, as in a real model (a 7B
llama: ~5%); at the default vocab of 32,000 and width 512 they are ~45% and dilute the HC cost.
"""

from __future__ import annotations

import argparse
import copy
import gc
import time

import _common as C
import torch

from hc_retrofit.train.compile import compile_layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_model_args(parser, batch=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--streams", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument(
        "--variants", nargs="+", default=["static", "dynamic", "mhc"], help="static, dynamic, mhc, mhc-static"
    )
    parser.add_argument(
        "--time-streams", type=int, nargs="*", default=None, help="time only these n (memory is measured for all)"
    )
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    C.add_timing_args(parser, repeats=7)
    args = parser.parse_args()
    C.apply_timing_args(args)
    if args.quick:
        args.hidden, args.layers, args.vocab, args.seq, args.batch = 128, 2, 1000, 64, 2
        args.repeats, args.warmup, args.streams = 3, 1, [4]

    device = args.device
    if args.compile:
        C.prepare_compile()
    config = C.model_config(args)
    original = C.random_model(config, device=device).train()
    ids = torch.randint(3, args.vocab, (args.batch, args.seq), device=device)

    pristine = copy.deepcopy(original)  # converted copies come from a model that was never compiled

    def step_fn(model):
        if args.compile:  # regional, as `hc-retrofit train --compile`: each decoder layer
            compile_layers(model)

        def step() -> None:
            model.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids).loss.backward()

        return step

    def memory(model) -> dict[str, float]:
        model.zero_grad(set_to_none=True)
        params = list(model.parameters())
        if torch.device(device).type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        with C.saved_activation_bytes(exclude=params) as saved:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        out = {"act": saved["bytes"], "peak": saved["bytes"] + 2 * C.param_bytes(model)}
        if torch.device(device).type == "cuda":
            out["cuda_peak"] = torch.cuda.max_memory_allocated()
        model.zero_grad(set_to_none=True)
        return out

    def first_call(step) -> float:
        """Wall seconds of the first step (with ``--compile``: tracing and compilation included)."""
        start = time.perf_counter()
        step()
        return time.perf_counter() - start

    base_mem = memory(original)
    base_step = step_fn(original)
    base_first = first_call(base_step) if args.compile else float("nan")
    rows = []
    print(
        f"llama hidden={args.hidden} layers={args.layers} vocab={args.vocab} seq={args.seq} batch={args.batch} "
        f"device={device} threads={torch.get_num_threads()} clock={args.clock}"
    )
    for variant in args.variants:
        for n in args.streams:
            kwargs = {"num_streams": n, "variant": "mhc" if variant.startswith("mhc") else variant}
            if variant == "mhc-static":
                kwargs["mhc_dynamic"] = False
            model = C.converted_copy(pristine, **kwargs).train()
            with torch.no_grad():
                diff = (model(input_ids=ids).logits - original(input_ids=ids).logits).abs().max().item()
            mem = memory(model)
            t0 = t1 = float("nan")
            first = float("nan")
            if args.time_streams is None or n in args.time_streams:
                step = step_fn(model)
                first = first_call(step) if args.compile else float("nan")
                times = C.interleaved(
                    {"original": base_step, "converted": step}, device, args.repeats, args.warmup, args.clock
                )
                t0, t1 = C.median(times["original"]), C.median(times["converted"])
            row = {
                "variant": variant,
                "n": n,
                "orig_s": t0,
                "hc_s": t1,
                "time": t1 / t0,
                "act": mem["act"] / base_mem["act"],
                "peak": mem["peak"] / base_mem["peak"],
                "act_MB": mem["act"] / 2**20,
                "max|dlogit|": f"{diff:.1e}",
            }
            if args.compile:
                row |= {"compile_s": first, "compile": first / base_first}
            if "cuda_peak" in mem:
                row["cuda_peak"] = mem["cuda_peak"] / base_mem["cuda_peak"]
            rows.append(row)
            C.print_table([row], list(row))
            del model
            gc.collect()
    print()
    columns = ["variant", "n", "orig_s", "hc_s", "time", "act", "peak", "act_MB", "max|dlogit|"]
    if args.compile:
        columns += ["compile_s", "compile"]
    if rows and "cuda_peak" in rows[0]:
        columns.append("cuda_peak")
    C.print_table(rows, columns)
    print(
        f"original: saved activations {base_mem['act'] / 2**20:.1f} MB, params {C.param_bytes(original) / 2**20:.1f} MB"
    )
    C.write_json(
        "train_step" + ("_quick" if args.quick else ""),
        {
            "settings": vars(args),
            "original": {"act_bytes": base_mem["act"], "param_bytes": C.param_bytes(original)},
            "rows": rows,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
