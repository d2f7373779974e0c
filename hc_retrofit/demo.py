"""`hc-retrofit demo`: the product's story on a real pretrained model, offline, in minutes on a CPU.

Everything is bundled in ``hc_retrofit/data/``: ``stories260K/`` (a real 260K-parameter llama
pretrained on TinyStories, from llama2.c, MIT licence, ~1 MB) and ~200 KB of Shakespeare (public
domain, the first part of karpathy's tinyshakespeare). The demo

1. loads the pretrained model and converts a copy per HC variant,
2. checks each retrofit is exact (max |logit difference| and identical greedy continuations;
   it refuses to go on otherwise),
3. continues plain (``--no-hc``) and HC on the Shakespeare with :func:`hc_retrofit.compare.run_compare`:
   each arm over its own LR grid, best LR chosen on a validation split, reported on a held-out one,
4. prints the table; ``OUT/demo.json`` holds it all, ``OUT/compare/compare.png`` the held-out loss
   against tokens and seconds.

The bundled byte-level BPE tokenizer (``demo_tokenizer.json``, :func:`build_tokenizer`) and the
random :func:`demo_model` are kept for tests that need a model of a given size without a file.
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

from hc_retrofit import outputs, ownership
from hc_retrofit.equivalence import model_dtype, probe_inputs, require_equivalent, run_probe
from hc_retrofit.modeling.config import HCConfig
from hc_retrofit.modeling.patch import hyper_connection_sites
from hc_retrofit.proof import convert
from hc_retrofit.train.errors import TrainingError

CORPUS = "shakespeare_200k.txt"
PRETRAINED = "stories260K"
TOKENIZER = "demo_tokenizer.json"
DEMO_FILE = "demo.json"
COMPARE_DIR = "compare"
EOS = "<|endoftext|>"
VOCAB_SIZE = 1024
#: the demo's own probe: the first tokens of the corpus, and how many greedy tokens follow them
DEMO_PROBE_TOKENS = 64
DEMO_NEW_TOKENS = 24
#: LR grid of every arm, and the HC LR multiplier grid (measured in the README's study)
DEMO_LR_GRID = (1e-3, 3e-3)
DEMO_HC_LR_MULTIPLIERS = (10.0,)

#: random model sizes (tests): "default" and "tiny"
SIZES: dict[str, dict[str, int]] = {
    "default": dict(
        hidden_size=96, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2
    ),
    "tiny": dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    ),
}


def data_file(name: str) -> Path:
    """Path of a file (or directory) bundled in ``hc_retrofit/data``."""
    return Path(str(resources.files("hc_retrofit") / "data" / name))


def corpus_path() -> Path:
    return data_file(CORPUS)


def pretrained_path() -> Path:
    """The bundled pretrained checkpoint (``stories260K``, a transformers llama dir)."""
    return data_file(PRETRAINED)


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


@dataclass
class DemoResult:
    """The retrofit check per variant and the comparison (:class:`~hc_retrofit.compare.CompareResult`)."""

    out_dir: str
    retrofit_max_abs_diff: float
    greedy_identical: bool
    params: dict[str, int] = field(default_factory=dict)
    compare: Any = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": PRETRAINED,
            "retrofit_max_abs_diff": self.retrofit_max_abs_diff,
            "greedy_identical": self.greedy_identical,
            "params": self.params,
            "compare": self.compare.to_dict() if self.compare is not None else None,
            "seconds": self.seconds,
        }


def demo_spec(
    out: Path, *, steps: int, quick: bool, variants: tuple[str, ...], streams: int, seeds: tuple[int, ...]
) -> Any:
    """The comparison the demo runs: plain vs ``variants`` on the bundled Shakespeare, fair LRs."""
    from hc_retrofit.compare import CompareSpec

    return CompareSpec(
        model=str(pretrained_path()),
        data=str(corpus_path()),
        out=str(out),
        variants=variants,
        streams=(streams,),
        seeds=seeds,
        lr_grid=DEMO_LR_GRID,
        hc_lr_multiplier_grid=DEMO_HC_LR_MULTIPLIERS,
        validation_fraction=0.1,
        heldout_fraction=0.1,
        train=dict(
            max_steps=steps,
            batch_size=4,
            block_size=64,
            warmup_steps=max(1, steps // 20),
            eval_every=max(1, steps // 2),
            eval_batches=4 if quick else 0,  # 0: the whole validation and held-out splits
            save_every=0,
            mixed_precision="no",
        ),
    )


def check_exact(base: Any, tokenizer: Any, variants: tuple[str, ...], streams: int) -> tuple[float, bool, dict]:
    """Convert a copy of ``base`` per variant; (max |logit diff|, greedy identical, parameter counts).

    Each conversion is proven exact by :func:`hc_retrofit.convert` (which refuses a model that is
    not): the demo never continues from a model that is not the pretrained one. It is then compared
    again on a longer text (the first tokens of the corpus and their greedy continuation), with the
    same comparison and tolerance (:mod:`hc_retrofit.equivalence`), to be shown; a difference beyond
    the tolerance stops the demo (:class:`~hc_retrofit.equivalence.NotEquivalentError`).
    """
    text = corpus_path().read_text()[:2000]
    inputs = probe_inputs(base, tokenizer=tokenizer, texts=(text,), batch=1, length=DEMO_PROBE_TOKENS)
    reference = run_probe(base, inputs, new_tokens=DEMO_NEW_TOKENS)
    worst, same = 0.0, True
    params = {"plain": sum(p.numel() for p in base.parameters())}
    for variant in variants:
        model = convert(copy.deepcopy(base), HCConfig(num_streams=streams, variant=variant)).eval()
        got = run_probe(model, inputs, new_tokens=DEMO_NEW_TOKENS)
        comparison = require_equivalent(reference, got, model_dtype(base), f"the {variant} retrofit")
        worst = max(worst, comparison.max_abs_logit_diff)
        same = same and comparison.greedy_identical
        params[f"{variant} n={streams}"] = sum(p.numel() for p in model.parameters())
        params[f"{variant} n={streams} (HC only)"] = sum(
            p.numel() for site in hyper_connection_sites(model) for p in site.parameters()
        )
    return worst, same, params


def run_demo(
    out: str | Path,
    *,
    steps: int = 200,
    quick: bool = False,
    variants: tuple[str, ...] = ("mhc",),
    streams: int = 4,
    overwrite: bool = False,
    progress: bool = True,
    seeds: tuple[int, ...] = (0,),
    log: Any = print,
) -> DemoResult:
    """Load, convert, verify, compare (see the module docstring); ``out/demo.json`` and ``out/compare/``.

    A second call with the same settings reads the finished runs of ``out/compare``; any other
    non-empty ``out`` (an earlier demo with other settings, or of an older version) needs
    ``overwrite``, which replaces only the demo's own files.
    """

    t_start = time.perf_counter()
    out = Path(out)
    resumable = (out / COMPARE_DIR / "compare.json").exists() and ownership.read_manifest(out) is not None
    if out.is_dir() and any(p.name != outputs.MARKER for p in out.iterdir()) and not (overwrite or resumable):
        raise TrainingError(
            f"{out} exists and is not empty (an earlier demo?): pass --overwrite to replace its results"
        )
    outputs.check_output_dir(out, overwrite=overwrite, resume=resumable, inputs=[pretrained_path()])
    with ownership.output_lock(out):
        return _run_demo_locked(out, steps, quick, variants, streams, overwrite, progress, seeds, log, t_start)


def _run_demo_locked(
    out: Path,
    steps: int,
    quick: bool,
    variants: tuple[str, ...],
    streams: int,
    overwrite: bool,
    progress: bool,
    seeds: tuple[int, ...],
    log: Any,
    t_start: float,
) -> DemoResult:
    """:func:`run_demo` while holding the lock of ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hc_retrofit.compare import run_compare

    spec = demo_spec(out / COMPARE_DIR, steps=steps, quick=quick, variants=variants, streams=streams, seeds=seeds)
    spec.validate()
    base = AutoModelForCausalLM.from_pretrained(pretrained_path(), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(pretrained_path())
    max_diff, same, params = check_exact(base, tokenizer, variants, streams)
    log(f"retrofit exact: max |logit diff| = {max_diff:.2e}, greedy continuation identical: {same}")
    ownership.adopt_dir(out, "demo")
    ownership.claim(out, [COMPARE_DIR])
    compared = run_compare(spec, overwrite=overwrite, progress=progress, log=log)
    result = DemoResult(str(out), max_diff, same, params, compared, time.perf_counter() - t_start)
    (out / DEMO_FILE).write_text(json.dumps(result.to_dict(), indent=2))
    ownership.record(out, [DEMO_FILE, COMPARE_DIR])
    return result
