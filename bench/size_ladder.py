"""Size ladder: streaming ``hc-retrofit convert`` of real-shaped checkpoints vs ``cp -r``.

    python bench/size_ladder.py                    # 1.5 GB, 1B and 3B llama shapes
    python bench/size_ladder.py --sizes 1b 3b 8b   # + 8B (~16 GB; needs ~50 GB free disk)
    python bench/size_ladder.py --quick            # a tiny rung, smoke test
    python bench/size_ladder.py --cold             # each command reads the checkpoint from disk

Each rung is a synthetic random bf16 checkpoint with the config of a real model (Llama-3.2-1B,
Llama-3.2-3B, Llama-3.1-8B) sharded as that model is on the Hub (5 GB shards; the 1B is one file;
"1.5gb" is the 1B's shapes with 8 of its 16 layers in 500 MB shards), written tensor by tensor
(never a whole model in memory). Then, in fresh processes, alternating:

* ``cp -r CKPT OUT``;
* ``hc-retrofit convert CKPT --out OUT --no-verify`` (streamed: copies the shards);
* the same with ``--link`` (hard links);

and once per rung the default ``hc-retrofit convert CKPT --out OUT``, which verifies the result
before moving it into place (both models in float32 in memory when they fit, else layer by
layer). Reported: median wall time, time / ``cp``, the convert's own time split (plan: imports,
config, weightless model, proof; copy: how long the background shard copy took and how long the
convert waited for it; verify), peak RSS (GNU ``time``'s ``%M``) and the peak RSS beyond the CLI's
own start-up (peak RSS of the same convert of a tiny checkpoint) as a fraction of the checkpoint
size, and the load average. Every checkpoint and output is deleted at the end (also on failure).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common as C
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hc_retrofit.streaming import write_safetensors  # noqa: E402

LLAMA3 = dict(
    vocab_size=128256,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=131072,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    bos_token_id=128000,
    eos_token_id=128001,
    torch_dtype="bfloat16",
)
# name -> (config overrides, Hub shard size; None = one file)
SHAPES: dict[str, tuple[dict[str, Any], str | None]] = {
    "tiny": (
        dict(
            hidden_size=256, intermediate_size=768, num_hidden_layers=2, vocab_size=4096, bos_token_id=1, eos_token_id=2
        ),
        None,
    ),
    "1.5gb": (  # the issue's ~1.5 GB sharded checkpoint: Llama-3.2-1B's shapes, 8 of its 16 layers, 500 MB shards
        dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=8, head_dim=64, tie_word_embeddings=True),
        "500MB",
    ),
    "1b": (  # meta-llama/Llama-3.2-1B: one model.safetensors (2.47 GB)
        dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, head_dim=64, tie_word_embeddings=True),
        None,
    ),
    "3b": (  # meta-llama/Llama-3.2-3B: 2 shards
        dict(
            hidden_size=3072,
            intermediate_size=8192,
            num_hidden_layers=28,
            num_attention_heads=24,
            head_dim=128,
            tie_word_embeddings=True,
        ),
        "5GB",
    ),
    "8b": (  # meta-llama/Llama-3.1-8B: 4 shards
        dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, tie_word_embeddings=False),
        "5GB",
    ),
}


def _size(text: str) -> int:
    number, unit = text[:-2], text[-2:]
    return int(float(number) * {"GB": 10**9, "MB": 10**6}[unit])


def build_checkpoint(name: str, path: Path, seed: int = 0) -> int:
    """A random bf16 checkpoint of shape ``name`` at ``path``, sharded like the Hub's; returns its bytes."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    overrides, shard = SHAPES[name]
    config = LlamaConfig(**{**LLAMA3, **overrides})
    config.dtype = torch.bfloat16
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    seen: set[int] = set()
    tensors: dict[str, torch.Tensor] = {}
    for key, t in meta.state_dict(keep_vars=True).items():  # tied weights once, as save_pretrained does
        if id(t) not in seen:
            seen.add(id(t))
            tensors[key] = t
    shards: list[list[str]] = [[]]
    limit, used = (_size(shard) if shard else None), 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if limit and shards[-1] and used + nbytes > limit:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += nbytes
    path.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)

    def random(key: str) -> torch.Tensor:
        t = tensors[key]
        if key.endswith("norm.weight"):
            return 1 + 0.1 * torch.randn(t.shape, generator=generator)
        return torch.randn(t.shape, generator=generator).mul_(0.02)

    specs = {k: (torch.bfloat16, list(t.shape)) for k, t in tensors.items()}
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)
    ]  # fmt: skip
    weight_map = {}
    for file, keys in zip(names, shards, strict=True):
        write_safetensors(path / file, keys, random, specs, {"format": "pt"})
        weight_map.update(dict.fromkeys(keys, file))
    if len(names) > 1:
        total = sum(t.numel() * 2 for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(path)
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def run(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Wall seconds, peak RSS (bytes) and stdout of ``cmd``.

    Through GNU ``/usr/bin/time``: the rusage of a child of this (torch-sized) process would start
    at this process's RSS (``ru_maxrss`` survives fork + exec); ``time``'s own child does not.
    """
    with tempfile.NamedTemporaryFile(mode="r", suffix=".time") as timing:
        start = time.perf_counter()
        proc = subprocess.run(
            ["/usr/bin/time", "-f", "%M", "-o", timing.name, *cmd], env=env, capture_output=True, text=True, check=False
        )
        seconds = time.perf_counter() - start
        lines = Path(timing.name).read_text().split()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return {"seconds": seconds, "peak_rss": float(int(lines[-1]) * 1024), "stdout": proc.stdout}


def evict(directory: Path) -> None:
    """Drop ``directory``'s files from the page cache (flushed first: dirty pages cannot be dropped),
    so that the next command reads them from disk: a cold start, as for a checkpoint downloaded
    some time ago. ``posix_fadvise(DONTNEED)`` needs no privileges."""
    for file in (f for f in directory.iterdir() if f.is_file()):
        with open(file, "rb+") as f:
            os.fsync(f.fileno())
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "hc_retrofit", *args]


SPLIT = re.compile(
    r"of which\s+plan (?P<plan>[\d.]+), files (?P<files>[\d.]+), copy (?P<copy>[\d.]+) \(waited (?P<wait>[\d.]+)\)"
    r"(?:, verify (?P<verify>[\d.]+))? s"
)


def time_split(stdout: str) -> dict[str, float]:
    """The convert's own time split (its "of which" row): plan, files, copy, copy wait, verify."""
    match = SPLIT.search(" ".join(stdout.split()))
    if not match:
        raise RuntimeError(f"no time split in the convert output:\n{stdout}")
    return {k: float(v) for k, v in match.groupdict().items() if v is not None}


def ladder_rung(
    name: str,
    work: Path,
    repeats: int,
    env: dict[str, str],
    startup_rss: float,
    verify: bool,
    cold: bool = False,
) -> dict[str, Any]:
    ckpt = work / f"llama-{name}"
    t0 = time.perf_counter()
    size = build_checkpoint(name, ckpt)
    files = len(list(ckpt.glob("*.safetensors")))
    print(f"[{name}] built {size / 1e9:.2f} GB in {files} file(s) in {time.perf_counter() - t0:.0f} s", flush=True)
    sides = {
        "cp -r": lambda out: ["cp", "-r", str(ckpt), str(out)],
        "convert --no-verify": lambda out: cli("convert", str(ckpt), "--out", str(out), "--no-verify"),
        "convert --link --no-verify": lambda out: cli("convert", str(ckpt), "--out", str(out), "--no-verify", "--link"),
    }
    results: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
    out = work / "out"
    try:
        for r in range(repeats):
            order = list(sides) if r % 2 == 0 else list(reversed(sides))
            for side in order:
                if cold:
                    evict(ckpt)
                res = run(sides[side](out), env)
                if side.startswith("convert"):
                    if "streamed" not in res["stdout"]:
                        raise RuntimeError(f"{side} did not stream:\n{res['stdout']}")
                    res["split"] = time_split(res["stdout"])
                results[side].append(res)
                print(
                    f"[{name}] {side}: {res['seconds']:.1f} s, peak RSS {res['peak_rss'] / 2**20:.0f} MiB"
                    + (f", split {res['split']}" if "split" in res else ""),
                    flush=True,
                )
                shutil.rmtree(out)
        if verify:  # the default convert: verify before the rename (in memory, or layer by layer if too large)
            if cold:
                evict(ckpt)
            res = run(cli("convert", str(ckpt), "--out", str(out)), env)
            if "verified exact" not in res["stdout"]:
                raise RuntimeError(f"convert did not verify exact:\n{res['stdout']}")
            res["split"] = time_split(res["stdout"])
            res["layer_by_layer"] = "verified exact (layer by layer)" in " ".join(
                res["stdout"].split()
            )  # table may wrap
            results["convert (verifies)"] = [res]
            print(
                f"[{name}] convert (verifies{', layer by layer' if res['layer_by_layer'] else ', in memory'}): "
                f"{res['seconds']:.1f} s, peak RSS {res['peak_rss'] / 2**20:.0f} MiB, split {res['split']}",
                flush=True,
            )
            shutil.rmtree(out)
    finally:
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(ckpt, ignore_errors=True)
    cp = statistics.median(x["seconds"] for x in results["cp -r"])
    rows = []
    for side, runs in results.items():
        seconds = statistics.median(x["seconds"] for x in runs)
        peak = max(x["peak_rss"] for x in runs)
        split = {k: statistics.median(x["split"].get(k, 0.0) for x in runs) for k in runs[0].get("split", {})}
        rows.append(
            {
                "model": name,
                "size_gb": size / 1e9,
                "files": files,
                "side": side,
                "seconds": seconds,
                "x_cp": seconds / cp,
                "copy_s": split.get("copy"),
                "copy_wait_s": split.get("wait"),
                "plan_s": split.get("plan"),
                "verify_s": split.get("verify"),
                "peak_rss_mib": peak / 2**20,
                "beyond_startup_x_size": (peak - startup_rss) / size if side != "cp -r" else None,
            }
        )
    return {"rows": rows, "runs": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["1.5gb", "1b", "3b"], choices=[s for s in SHAPES if s != "tiny"])
    parser.add_argument(
        "--no-verify-run",
        action="store_true",
        help="skip the once-per-rung default convert (which verifies: in memory, or layer by layer)",
    )
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--cold",
        action="store_true",
        help="drop the checkpoint from the page cache before every command (default: warm, just written)",
    )
    parser.add_argument("--workdir", default=None, help="where the checkpoints go (default: a temp dir)")
    parser.add_argument("--quick", action="store_true", help="only the tiny rung, once")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    sizes, repeats = (["tiny"], 1) if args.quick else (args.sizes, args.repeats)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    work = Path(tempfile.mkdtemp(prefix="hc_size_ladder_", dir=args.workdir))
    try:
        # the CLI's own start-up: peak RSS of the same streamed convert of a tiny checkpoint
        build_checkpoint("tiny", work / "startup")
        startup = run(cli("convert", str(work / "startup"), "--out", str(work / "startup-out"), "--no-verify"), env)
        shutil.rmtree(work / "startup-out")
        print(f"CLI start-up (tiny convert): peak RSS {startup['peak_rss'] / 2**20:.0f} MiB", flush=True)
        rungs = {
            name: ladder_rung(name, work, repeats, env, startup["peak_rss"], not args.no_verify_run, args.cold)
            for name in sizes
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = [row for rung in rungs.values() for row in rung["rows"]]
    print()
    C.print_table(
        rows,
        [
            "model",
            "size_gb",
            "files",
            "side",
            "seconds",
            "x_cp",
            "plan_s",
            "copy_s",
            "copy_wait_s",
            "verify_s",
            "peak_rss_mib",
            "beyond_startup_x_size",
        ],
    )
    print(f"page cache: {'cold (evicted before each command)' if args.cold else 'warm'}")
    print(f"load average at the end: {os.getloadavg()}")
    payload = {
        "settings": {"sizes": sizes, "repeats": repeats, "cold": args.cold},
        "startup_peak_rss": startup["peak_rss"],
        "rows": rows,
        "load_average_end": os.getloadavg(),
        "runs": {
            name: {k: [{kk: vv for kk, vv in x.items() if kk != "stdout"} for x in v] for k, v in rung["runs"].items()}
            for name, rung in rungs.items()
        },
    }
    C.write_json("size_ladder" + ("_quick" if args.quick else ""), payload, args.out)


if __name__ == "__main__":
    main()
