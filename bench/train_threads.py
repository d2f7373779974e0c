"""Training throughput of ``hc-retrofit train`` by CPU threads: the default against every ``--threads``.

Each setting trains the bundled stories260K (converted on the fly, mHC n=4) on the bundled
Shakespeare excerpt for ``--steps`` steps, in a fresh process (torch's thread pool is set once
per process), and reads the run's ``summary.json`` (tokens/s over the training steps only; eval
and saving are not counted). Settings are interleaved round by round (default, 1, 2, ...,
default, 1, 2, ...) so a machine whose load changes affects all of them alike; each is summarised
by its median. The result is the default's tok/s as a fraction of the best setting's.

    python bench/train_threads.py                # rounds=3, steps=30
    python bench/train_threads.py --processes 2  # two processes (accelerate launch, DDP on gloo)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import ROOT, print_table, write_json


def run_once(threads: int | None, args: argparse.Namespace, work: Path) -> tuple[float, int]:
    """tok/s of one short training run with ``--threads threads`` (``None``: the default)."""
    from hc_retrofit.demo import corpus_path, pretrained_path

    out = Path(tempfile.mkdtemp(dir=work))
    out.rmdir()
    train = [
        "train", str(pretrained_path()), "--data", str(corpus_path()), "--out", str(out),
        "--max-steps", str(args.steps), "--batch-size", str(args.batch_size), "--block-size", str(args.block_size),
        "--eval-every", "0", "--eval-fraction", "0.05", "--save-every", "0", "--warmup-steps", "2",
        "--cache-dir", str(work / "cache"), "--no-progress",
    ]  # fmt: skip
    if threads is not None:
        train += ["--threads", str(threads)]
    if args.processes > 1:
        cmd = [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
            str(args.processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "-m", "hc_retrofit", *train,
        ]  # fmt: skip
    else:
        cmd = [sys.executable, "-m", "hc_retrofit", *train]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # as a user's shell has it
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"train failed ({' '.join(cmd)}):\n{done.stderr[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    return float(summary["tokens_per_s"]), int(summary["threads"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--max-threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", help="JSON file (default bench/results/train_threads.json)")
    args = parser.parse_args()

    settings: list[int | None] = [None, *range(1, args.max_threads + 1)]
    speeds: dict[int | None, list[float]] = {s: [] for s in settings}
    default_threads = None
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for r in range(args.rounds):
            for s in settings:
                tps, used = run_once(s, args, work)
                speeds[s].append(tps)
                if s is None:
                    default_threads = used
                print(f"round {r + 1}: threads {'default' if s is None else s}: {tps:,.0f} tok/s", flush=True)
    medians = {s: statistics.median(v) for s, v in speeds.items()}
    best = max(v for s, v in medians.items() if s is not None)
    rows = [
        {
            "threads": f"default ({default_threads})" if s is None else str(s),
            "tok/s": round(medians[s]),
            "x best": medians[s] / best,
        }
        for s in settings
    ]
    print(f"\n{args.processes} process(es), {os.cpu_count()} CPUs, median of {args.rounds} rounds")
    print_table(rows, ["threads", "tok/s", "x best"])
    ratio = medians[None] / best
    print(f"default / best = {ratio:.2f}")
    write_json(
        "train_threads",
        {
            "settings": vars(args),
            "default_threads": default_threads,
            "tokens_per_s": {("default" if s is None else str(s)): v for s, v in speeds.items()},
            "median": {("default" if s is None else str(s)): medians[s] for s in settings},
            "default_over_best": ratio,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
