"""Shared helpers of the benchmark scripts: models, timing, saved-activation accounting, output.

Not part of the package: the scripts in ``bench/`` import this file as a sibling module.

Timing rules (the machine is noisy): every measurement is a *ratio against the original model
in the same run*; original and converted runs are interleaved (A B A B ...) after warm-up, and
each side is summarised by its median.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))


# ----------------------------------------------------------------------------- models
def llama_config(hidden: int = 512, layers: int = 6, vocab: int = 32000, heads: int = 8, kv_heads: int = 8):
    """A llama-style config of realistic width (intermediate ~2.7x hidden, like Llama 2)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=hidden,
        intermediate_size=int(hidden * 8 / 3) // 64 * 64,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


#: A real model's shape (Qwen3-0.6B's config; random weights): ``--shape qwen3-0.6b``.
QWEN3_0_6B = dict(
    hidden_size=1024,
    intermediate_size=3072,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=151936,
    max_position_embeddings=40960,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def model_config(args):
    """The config ``--shape`` names: ``llama`` (sized by ``--hidden/--layers/--vocab``) or ``qwen3-0.6b``."""
    if getattr(args, "shape", "llama") == "qwen3-0.6b":
        from transformers import Qwen3Config

        return Qwen3Config(**QWEN3_0_6B)
    return llama_config(args.hidden, args.layers, args.vocab)


def random_model(config, seed: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """A randomly initialised causal LM (norm weights perturbed so they matter)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.02)
    return model.to(device)


def converted_copy(model, **hc_kwargs):
    """A deep copy of ``model`` converted with ``HCConfig(**hc_kwargs)`` (the original is untouched)."""
    import copy

    import hc_retrofit

    return hc_retrofit.convert(copy.deepcopy(model), hc_retrofit.HCConfig(**hc_kwargs))


# ----------------------------------------------------------------------------- timing
def synchronize(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def timed(fn: Callable[[], Any], device: str | torch.device, clock: str = "wall") -> float:
    """Seconds of one call of ``fn`` (device work included).

    ``clock="wall"`` is elapsed time; ``"cpu"`` is the CPU time of this process (all threads),
    which other processes competing for the cores disturb much less (use it with ``--threads 1``
    on a shared machine; CPU only).
    """
    now = CLOCKS[clock]
    synchronize(device)
    start = now()
    fn()
    synchronize(device)
    return now() - start


def add_timing_args(parser, *, repeats: int) -> None:
    """The options every timing script shares: device, repeats, smoke mode, output, threads, clock."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--quick", action="store_true", help="small model, few repeats (smoke test)")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/<script>.json)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="wall time or process CPU time")


def add_model_args(parser, *, batch: int) -> None:
    """The llama-style model size options (see :func:`llama_config`)."""
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--shape", choices=["llama", "qwen3-0.6b"], default="llama", help="qwen3-0.6b: a real shape")


def apply_timing_args(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)


def interleaved(
    fns: dict[str, Callable[[], Any]], device: str | torch.device, repeats: int, warmup: int = 1, clock: str = "wall"
) -> dict[str, list[float]]:
    """Run every ``fn`` ``warmup`` times, then ``repeats`` rounds of one call each, interleaved.

    The order inside a round alternates (forward, then reversed), so slow drifts of the machine
    hit every contender alike. Returns the list of times per name.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names if r % 2 == 0 else reversed(names):
            times[name].append(timed(fns[name], device, clock))
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def prepare_compile() -> None:
    """Make first-call compile times comparable: no cached graphs, one-time costs paid up front.

    Inductor's on-disk caches would make a graph compiled in an earlier run (or earlier in this
    one) nearly free, and the first compilation of a process pays imports and start-up for all
    later ones; so both caches are off and a tiny function is compiled once before timing.
    """
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = False
    inductor_config.autotune_local_cache = False
    with contextlib.suppress(AttributeError):
        torch._functorch.config.enable_autograd_cache = False
    x = torch.randn(8, requires_grad=True)
    torch.compile(lambda t: (t.sin() * 2).sum())(x).backward()
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- memory
@contextlib.contextmanager
def saved_activation_bytes(exclude: list[torch.Tensor] | None = None) -> Iterator[dict[str, int]]:
    """Count the bytes autograd saves for backward inside the ``with`` block.

    Every tensor autograd packs (``torch.autograd.graph.saved_tensors_hooks``) is attributed to
    its storage; each storage is counted once (views and the same tensor saved twice cost
    nothing extra) at its full size, and storages of ``exclude`` (the parameters, which exist
    anyway) are skipped. This is deterministic and device independent, and it is what gradient
    checkpointing and HC recomputation change: the activation memory of a training step.
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude or []}
    seen: dict[int, int] = {}
    out = {"bytes": 0}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "meta":
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in skip and ptr not in seen:
                seen[ptr] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield out
    out["bytes"] = sum(seen.values())


def param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


# ----------------------------------------------------------------------------- machine, output
def machine() -> dict[str, Any]:
    """What the numbers ran on."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import transformers

    info: dict[str, Any] = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name()
    return info


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    """A plain aligned text table of ``rows`` (only ``columns``)."""

    def fmt(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)))


def finish(name: str, rows: list[dict[str, Any]], args: Any) -> Path:
    """Print the summary table of ``rows`` and write them with the run's settings.

    The JSON is ``bench/results/<name>[_compile][_quick].json`` (or ``--out``), the suffixes taken
    from ``args.compile`` and ``args.quick`` where the script has them.
    """
    print()
    print_table(rows, list(rows[0]))
    name += "_compile" if getattr(args, "compile", False) else ""
    name += "_quick" if getattr(args, "quick", False) else ""
    return write_json(name, {"settings": vars(args), "rows": rows}, getattr(args, "out", None))


def write_json(name: str, payload: dict[str, Any], out: str | None = None) -> Path:
    """Write ``payload`` (plus the machine description) to ``out`` or ``bench/results/<name>.json``."""
    path = Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "machine": machine(), **payload}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")
    return path
