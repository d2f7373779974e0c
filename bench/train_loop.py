"""The real ``hc-retrofit train`` loop: tokens/s of HC vs the plain model, eager and ``--compile``.

    python bench/train_loop.py                      # llama-style hidden 512, 6 layers, 4 x 256 tokens
    python bench/train_loop.py --compile            # regional compilation (train --compile)
    python bench/train_loop.py --quick

Where ``train_step.py`` times the model's forward and backward alone, this runs what a user runs:
:func:`hc_retrofit.train.train` (accelerate, AdamW, clipping, scheduler, logging) on the bundled
corpus and tokenizer, from one random llama-style model, plain (``no_hc``) and converted per
variant, ``--steps`` optimiser steps each. ``tok/s`` is the median of the per-step throughput the
run logs, from step 2 on (step 0 compiles under ``--compile``); arms alternate in each repeat and
``ratio`` = HC tok/s / plain tok/s (>= 1: no slower), the median over repeats.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
from pathlib import Path

import _common as C
import torch

from hc_retrofit.demo import corpus_path, demo_tokenizer
from hc_retrofit.train import train
from hc_retrofit.train.metrics import read_metrics
from hc_retrofit.train.recipe import TrainConfig


def run_arm(base, tokenizer, args, work: Path, name: str, variant: str | None) -> float:
    """Median logged tokens/s (steps >= 2) of one ``train`` run of ``variant`` (``None``: plain)."""
    out = work / name
    cfg = TrainConfig(
        data=str(corpus_path()),
        out=str(out),
        no_hc=variant is None,
        variant=variant or "mhc",
        streams=args.streams,
        block_size=args.seq,
        batch_size=args.batch,
        max_steps=args.steps,
        warmup_steps=1,
        eval_fraction=0.02,
        eval_every=0,
        eval_batches=1,
        save_every=0,
        cache_dir=str(work / "cache"),
        progress=False,
        overwrite=True,
        compile=args.compile,
        cpu=torch.device(args.device).type == "cpu",
    )
    train(cfg, model=copy.deepcopy(base), tokenizer=tokenizer)
    rates = [r["tokens_per_s"] for r in read_metrics(out) if "tokens_per_s" in r and r["step"] >= 2]
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--variants", nargs="+", default=["static", "dynamic", "mhc"])
    parser.add_argument("--compile", action="store_true", help="train --compile (regional, Inductor)")
    C.add_timing_args(parser, repeats=2)
    args = parser.parse_args()
    C.apply_timing_args(args)
    if args.quick:
        args.hidden, args.layers, args.seq, args.batch, args.steps, args.repeats = 128, 2, 64, 2, 4, 1

    tokenizer = demo_tokenizer()
    config = C.llama_config(args.hidden, args.layers, len(tokenizer))
    base = C.random_model(config)
    arms = [("plain", None), *((v, v) for v in args.variants)]
    rates: dict[str, list[float]] = {name: [] for name, _ in arms}
    print(
        f"train loop: llama hidden={args.hidden} layers={args.layers} {args.batch}x{args.seq} tokens/step "
        f"steps={args.steps} n={args.streams} compile={args.compile} threads={torch.get_num_threads()}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for name, variant in arms if r % 2 == 0 else reversed(arms):
                rates[name].append(run_arm(base, tokenizer, args, Path(tmp), name, variant))
                print(f"  repeat {r}: {name:<8} {rates[name][-1]:10,.0f} tok/s")
    plain = rates["plain"]
    rows = [
        {
            "variant": name,
            "n": args.streams,
            "plain_tok_s": statistics.median(plain),
            "hc_tok_s": statistics.median(rates[name]),
            "ratio": statistics.median(h / p for h, p in zip(rates[name], plain, strict=True)),
        }
        for name, _ in arms[1:]
    ]
    C.finish("train_loop", rows, args)


if __name__ == "__main__":
    main()
