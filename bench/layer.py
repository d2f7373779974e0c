"""One decoder layer, converted vs original: forward+backward time at realistic widths.

    python bench/layer.py                          # widths 512 1024 2048, 2 x 256 tokens, n = 4
    python bench/layer.py --compile                # both layers torch.compile'd (Inductor)
    python bench/layer.py --threads 1 --clock cpu  # on a shared machine
    python bench/layer.py --quick

HC's cost relative to a layer falls roughly as ``n / width`` (the HC work is ``O(n D)`` per token,
the layer's ``O(D^2)``), so a whole-model benchmark whose LM head is a large share of the step
(a small model with a 32k vocabulary) hides it, and one at a single small width overstates it.
This times the *middle* layer of a 3-layer llama-style model (intermediate ~2.7x width, head dim
64), the layer every real model has dozens of: its input is the previous layer's streams
``(B, T, n, D)`` (a leaf that needs a gradient, as inside a network), its output is streams, and
the step is ``out.backward(g)`` with a fixed ``g``. The original layer gets the same hidden state
``(B, T, D)``, mask, rotary embeddings and ``g`` averaged over streams. Both run in the same
process, interleaved after warm-up; ``time`` = converted median / original median.
``compile_s``: the first compiled call of each (tracing + Inductor), and its ratio.
"""

from __future__ import annotations

import argparse
import copy
import time

import _common as C
import torch

import hc_retrofit
from hc_retrofit.modeling.patch import decoder_layers


def layer_inputs(model, ids: torch.Tensor) -> tuple[tuple, dict]:
    """The positional and keyword arguments the model passes to its layer 1 (captured by a hook)."""
    captured: dict = {}

    def hook(_module, args, kwargs):
        captured["args"], captured["kwargs"] = args, kwargs

    handle = decoder_layers(model)[1].register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    handle.remove()
    return captured["args"], captured["kwargs"]


def step_fn(layer, hidden: torch.Tensor, kwargs: dict, grad: torch.Tensor, compiled: bool):
    """One forward+backward of ``layer`` on a fresh leaf copy of ``hidden``."""
    fwd = torch.compile(layer) if compiled else layer

    def step() -> None:
        layer.zero_grad(set_to_none=True)
        x = hidden.detach().requires_grad_(True)
        out = fwd(x, **kwargs)
        (out[0] if isinstance(out, tuple) else out).backward(grad)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--variants", nargs="+", default=["static", "dynamic", "mhc"])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="torch.compile both layers (Inductor)")
    C.add_timing_args(parser, repeats=7)
    args = parser.parse_args()
    C.apply_timing_args(args)
    if args.quick:
        args.widths, args.seq, args.repeats, args.warmup = [128], 64, 3, 1

    device, n = args.device, args.streams
    if args.compile:
        C.prepare_compile()
    print(
        f"llama layer, widths={args.widths} tokens={args.batch}x{args.seq} n={n} compile={args.compile} "
        f"device={device} threads={torch.get_num_threads()} clock={args.clock}"
    )
    rows = []
    for width in args.widths:
        config = C.llama_config(width, layers=3, vocab=512, heads=width // 64, kv_heads=width // 64)
        original = C.random_model(config, device=device).train()
        ids = torch.randint(3, 512, (args.batch, args.seq), device=device)
        base_args, base_kwargs = layer_inputs(original, ids)
        base_layer = decoder_layers(original)[1]
        torch.manual_seed(1)
        g = torch.randn(args.batch, args.seq, n, width, device=device)
        base = step_fn(base_layer, base_args[0], base_kwargs, g.mean(-2), args.compile)
        base_compile = float("nan")
        if args.compile:
            torch._dynamo.reset()
            base_compile = C.timed(base, device)
        for variant in args.variants:
            model = hc_retrofit.convert(
                copy.deepcopy(original), hc_retrofit.HCConfig(num_streams=n, variant=variant)
            ).train()
            hc_args, hc_kwargs = layer_inputs(model, ids)
            # Streams that differ (as after training), so no path sees n equal copies.
            streams = hc_args[0] + 0.1 * torch.randn(hc_args[0].shape, device=device)
            converted = step_fn(decoder_layers(model)[1], streams, hc_kwargs, g, args.compile)
            compile_s = float("nan")
            if args.compile:
                start = time.perf_counter()
                converted()
                compile_s = time.perf_counter() - start
            times = C.interleaved(
                {"original": base, "converted": converted}, device, args.repeats, args.warmup, args.clock
            )
            t0, t1 = C.median(times["original"]), C.median(times["converted"])
            row = {"width": width, "variant": variant, "n": n, "orig_ms": 1e3 * t0, "hc_ms": 1e3 * t1, "time": t1 / t0}
            if args.compile:
                row |= {"compile_s": compile_s, "compile": compile_s / base_compile}
            rows.append(row)
            C.print_table([row], list(row))
            del model
    C.finish("layer", rows, args)


if __name__ == "__main__":
    main()
