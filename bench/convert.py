"""Conversion cost: ``hc-retrofit convert`` vs plain ``from_pretrained`` + ``save_pretrained``.

    python bench/convert.py            # builds a ~670 MiB random llama checkpoint first (cached)
    python bench/convert.py --quick

Each side runs in a fresh subprocess (so peak RSS is its own), alternately, ``--repeats`` times:

* ``plain``: ``AutoModelForCausalLM.from_pretrained(ckpt)`` then ``save_pretrained(out)``;
* ``convert``: the default CLI, ``hc-retrofit convert ckpt --out out --overwrite``: streams (copies
  the base shards, adds the HC shard) and verifies the written checkpoint (one model in memory:
  the base, then the written tensors loaded into it after the recorded surgery);
* ``in-memory``: ``... --in-memory --no-verify`` (load, retrofit and prove, save with the
  remote-code files). All run in-process through ``hc_retrofit.cli.app.main``.

Reported: median time (``--clock wall``: elapsed; ``cpu``: the process's CPU time, all threads,
far less disturbed by other jobs on a shared machine; both are recorded), and peak RSS
(``ru_maxrss``) minus the RSS after the imports, i.e. the memory the work itself needed, as a
multiple of the checkpoint's size on disk. ``spread`` is (max - min) / median of the repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import _common as C

CHILD = r"""
import json, resource, sys, time
import psutil, torch, transformers, hc_retrofit, hc_retrofit.cli.app
from transformers import AutoModelForCausalLM
base_rss = psutil.Process().memory_info().rss
side, ckpt, out = sys.argv[1:4]
start, cpu_start = time.perf_counter(), time.process_time()
if side == "plain":
    AutoModelForCausalLM.from_pretrained(ckpt).save_pretrained(out)
else:
    sys.argv = ["hc-retrofit", "convert", ckpt, "--out", out, "--overwrite", "--variant", "mhc", "--streams", "4"]
    if side == "in-memory":
        sys.argv += ["--in-memory", "--no-verify"]
    try:
        hc_retrofit.cli.app.main()
    except SystemExit as e:
        if e.code not in (0, None):
            raise
elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print("RESULT", json.dumps({"seconds": elapsed, "cpu_seconds": cpu, "peak_rss": peak, "base_rss": base_rss}))
"""


def build_checkpoint(path: Path, hidden: int, layers: int, vocab: int) -> int:
    """A random llama checkpoint at ``path`` (reused if present); returns its weight bytes."""
    if not (path / "config.json").exists():
        model = C.random_model(C.llama_config(hidden, layers, vocab))
        model.save_pretrained(path)
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def run_side(side: str, ckpt: Path, out: Path, threads: int | None = None) -> dict:
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, side, str(ckpt), str(out)], capture_output=True, text=True, check=False, env=env
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{side} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=18)  # ~670 MiB of float32 weights
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "hc_bench_convert"))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per side (OMP_NUM_THREADS)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="elapsed or process CPU time")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.layers, args.vocab, args.repeats = 128, 2, 1000, 1
    work = Path(args.workdir)
    ckpt = work / f"llama-h{args.hidden}-l{args.layers}-v{args.vocab}"
    size = build_checkpoint(ckpt, args.hidden, args.layers, args.vocab)
    print(f"checkpoint {ckpt}: {size / 2**20:.0f} MB of weights")
    results: dict[str, list[dict]] = {"plain": [], "convert": [], "in-memory": []}
    for r in range(args.repeats):
        for side in list(results) if r % 2 == 0 else list(results)[::-1]:
            res = run_side(side, ckpt, work / f"out-{side}", args.threads)
            results[side].append(res)
            print(side, {k: round(v, 2) if k.endswith("seconds") else v // 2**20 for k, v in res.items()})
    summary = {}
    key = "seconds" if args.clock == "wall" else "cpu_seconds"
    for side, runs in results.items():
        times = [x[key] for x in runs]
        summary[side] = {
            "seconds": C.median(times),
            "spread": (max(times) - min(times)) / C.median(times),
            "work_rss_mb": max(x["peak_rss"] - x["base_rss"] for x in runs) / 2**20,
        }
        summary[side]["work_rss_x_model"] = summary[side]["work_rss_mb"] * 2**20 / size
    rows = [
        {
            "side": side,
            **s,
            "time_ratio": s["seconds"] / summary["plain"]["seconds"],
            "memory_ratio": s["work_rss_mb"] / summary["plain"]["work_rss_mb"],
        }
        for side, s in summary.items()
    ]
    print()
    print(f"times: {args.clock} clock")
    C.print_table(rows, ["side", "seconds", "spread", "time_ratio", "work_rss_mb", "memory_ratio", "work_rss_x_model"])
    C.write_json(
        "convert" + ("_quick" if args.quick else ""),
        {"settings": vars(args), "checkpoint_bytes": size, "rows": rows, "runs": results},
        args.out,
    )


if __name__ == "__main__":
    main()
