"""`hc-retrofit demo`: the whole story offline, in minutes on a laptop CPU.

Everything is bundled in ``hc_retrofit/data/``: ~200 KB of Shakespeare (public domain, the
first part of karpathy's tinyshakespeare) and a byte-level BPE tokenizer trained on it
(:func:`build_tokenizer` made it). The demo

1. builds a small llama locally (random init, fixed seed; no Hub access),
2. converts a copy to mHC and checks the retrofit is exact (max |logit difference|),
3. trains the plain copy (``--no-hc``) and the converted copy through the same
   :func:`~hc_retrofit.train.train` pipeline, same data order and settings,
4. prints a comparison table and writes a loss plot with both runs.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from hc_retrofit.config import HCConfig
from hc_retrofit.patch import convert, hyper_connection_sites
from hc_retrofit.train.errors import TrainingError
from hc_retrofit.train.loop import TrainResult, train
from hc_retrofit.train.metrics import plot_losses, read_metrics
from hc_retrofit.train.recipe import TrainConfig

CORPUS = "shakespeare_200k.txt"
TOKENIZER = "demo_tokenizer.json"
EOS = "<|endoftext|>"
VOCAB_SIZE = 1024

#: model sizes: "default" for the demo, "tiny" for tests and --quick
SIZES: dict[str, dict[str, int]] = {
    "default": dict(
        hidden_size=96, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2
    ),
    "tiny": dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    ),
}


def data_file(name: str) -> Path:
    """Path of a file bundled in ``hc_retrofit/data``."""
    return Path(str(resources.files("hc_retrofit") / "data" / name))


def corpus_path() -> Path:
    return data_file(CORPUS)


def build_tokenizer(corpus: str | Path, vocab_size: int = VOCAB_SIZE) -> Any:
    """Train the byte-level BPE tokenizer shipped as ``demo_tokenizer.json`` (how it was made)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(corpus)], trainer)
    return tok


def demo_tokenizer() -> Any:
    """The bundled tokenizer as a transformers tokenizer (EOS = ``<|endoftext|>``)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_file=str(data_file(TOKENIZER)), eos_token=EOS, bos_token=EOS, pad_token=EOS
    )


def demo_model(size: str = "default", *, vocab_size: int = VOCAB_SIZE, seed: int = 0) -> Any:
    """A randomly initialised small ``LlamaForCausalLM`` (tied embeddings), built locally."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        **SIZES[size],
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


@torch.no_grad()
def retrofit_error(base: Any, converted: Any, input_ids: torch.Tensor) -> float:
    """Max |logit difference| between the base and the converted model on ``input_ids``."""
    return float((base(input_ids=input_ids).logits - converted(input_ids=input_ids).logits).abs().max())


@dataclass
class DemoResult:
    """The comparison: one :class:`TrainResult` per run, the retrofit error and the plot."""

    out_dir: str
    retrofit_max_abs_diff: float
    runs: dict[str, TrainResult] = field(default_factory=dict)
    params: dict[str, int] = field(default_factory=dict)
    plot: str = ""
    seconds: float = 0.0

    def table(self) -> list[dict[str, Any]]:
        rows = []
        for name, r in self.runs.items():
            rows.append(
                {
                    "run": name,
                    "params": self.params[name],
                    "step-0 loss": r.step0_loss,
                    "eval loss start": r.initial_eval_loss,
                    "eval loss end": r.final_eval_loss,
                    "tok/s": r.tokens_per_s,
                    "train s": r.train_seconds,
                }
            )
        return rows


def run_demo(
    out: str | Path,
    *,
    steps: int = 300,
    quick: bool = False,
    variants: tuple[str, ...] = ("mhc",),
    streams: int = 4,
    overwrite: bool = False,
    progress: bool = True,
    seed: int = 0,
) -> DemoResult:
    """Build, convert, verify and train plain vs HC (see the module docstring).

    Like ``convert`` and ``train``, refuses a non-empty ``out`` (an earlier demo's results) unless
    ``overwrite``; with it, each run directory is replaced as ``train(overwrite=True)`` does.
    """
    t_start = time.perf_counter()
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise TrainingError(
            f"{out} exists and is not empty (an earlier demo?): pass --overwrite to replace its results"
        )
    tokenizer = demo_tokenizer()
    size = "tiny" if quick else "default"
    base = demo_model(size, vocab_size=len(tokenizer), seed=seed)
    common = dict(
        data=str(corpus_path()),
        block_size=64 if quick else 128,
        batch_size=4 if quick else 8,
        max_steps=steps,
        lr=2e-3,
        warmup_steps=max(1, steps // 10),
        eval_fraction=0.1,
        eval_every=max(1, steps // 6),
        eval_batches=4 if quick else 8,
        save_every=0,
        seed=seed,
        overwrite=overwrite,
        progress=progress,
        streams=streams,
    )
    probe = torch.tensor([tokenizer(Path(common["data"]).read_text()[:4000])["input_ids"][: common["block_size"]]])
    runs: dict[str, tuple[Any, TrainConfig]] = {
        "plain": (copy.deepcopy(base), TrainConfig(out=str(out / "plain"), no_hc=True, **common))
    }
    max_diff = 0.0
    for variant in variants:
        model = convert(copy.deepcopy(base), HCConfig(num_streams=streams, variant=variant))
        max_diff = max(max_diff, retrofit_error(base, model, probe))
        runs[f"{variant} n={streams}"] = (model, TrainConfig(out=str(out / variant), variant=variant, **common))
    result = DemoResult(out_dir=str(out), retrofit_max_abs_diff=max_diff)
    for name, (model, cfg) in runs.items():
        result.params[name] = sum(p.numel() for p in model.parameters())
        result.runs[name] = train(cfg, model=model, tokenizer=tokenizer)
    result.plot = str(
        plot_losses(
            {name: read_metrics(r.out_dir) for name, r in result.runs.items()},
            out / "comparison.png",
            title="hc-retrofit demo: plain vs hyper-connections (same data order)",
        )
    )
    result.seconds = time.perf_counter() - t_start
    (out / "demo.json").write_text(
        json.dumps(
            {
                "retrofit_max_abs_diff": max_diff,
                "hc_params": {
                    n: sum(p.numel() for s in hyper_connection_sites(m) for p in s.parameters())
                    for n, (m, _) in runs.items()
                },
                "table": result.table(),
                "seconds": result.seconds,
            },
            indent=2,
        )
    )
    return result
