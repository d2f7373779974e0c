"""Tiny checkpoints for the serving tests: llama and qwen2 at head_dim 64 (vLLM's CPU attention
refuses smaller heads), converted with each variant, as converted (exact) and with perturbed HC
parameters (streams that diverge, so that a lost hook or a coefficient loaded wrong changes tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

import hc_retrofit
from hc_retrofit.modeling.patch import hyper_connection_sites
from tests.checkpoints import word_tokenizer
from tests.tiny import VOCAB

FAMILIES = ("llama", "qwen2")
VARIANTS = ("static", "dynamic", "mhc")
PROMPTS = [[1, 5, 9, 13, 20, 7], [1, 30, 31, 40]]
MAX_TOKENS = 8


def serving_config(family: str):
    """hidden 128, 2 heads of 64 (one KV head), 2 layers; qwen2 with tied embeddings (and its qkv bias)."""
    return AutoConfig.for_model(
        family,
        hidden_size=128,
        intermediate_size=256,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_hidden_layers=2,
        vocab_size=VOCAB,
        max_position_embeddings=256,
        tie_word_embeddings=family == "qwen2",
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def base_model(family: str, seed: int = 0) -> PreTrainedModel:
    """A random tiny ``family`` causal LM whose norms and biases are not at their init (they matter)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(serving_config(family), dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def perturb(model: PreTrainedModel, seed: int = 1) -> PreTrainedModel:
    """Move every HC parameter off its exact init (coefficients by ~0.3, dynamic projections by ~0.02)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for site in hyper_connection_sites(model):
            for name, p in site.named_parameters():
                p.add_(torch.randn(p.shape, generator=generator) * (0.02 if "proj" in name else 0.3))
            site.clear_cache()
    return model


def greedy(model: PreTrainedModel, prompts: list[list[int]] = PROMPTS, max_tokens: int = MAX_TOKENS) -> list[list[int]]:
    """transformers' greedy continuation of each prompt (exactly ``max_tokens`` tokens)."""
    out = []
    with torch.no_grad():
        for prompt in prompts:
            ids = model.generate(
                torch.tensor([prompt]), max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False
            )
            out.append(ids[0, len(prompt) :].tolist())
    return out


def token_logprobs(
    model: PreTrainedModel, prompts: list[list[int]], continuations: list[list[int]]
) -> list[list[float]]:
    """The log-probability ``model`` gives each token of each continuation (teacher-forced, float64 softmax)."""
    out = []
    with torch.no_grad():
        for prompt, continuation in zip(prompts, continuations, strict=True):
            ids = torch.tensor([prompt + continuation])
            logits = model(ids).logits[0, len(prompt) - 1 : -1].double()
            out.append(logits.log_softmax(-1).gather(-1, torch.tensor(continuation)[:, None])[:, 0].tolist())
    return out


@dataclass
class Served:
    """One converted checkpoint and what transformers generates for it."""

    family: str
    variant: str
    perturbed: bool
    directory: Path
    expected: list[list[int]]
    logprobs: list[list[float]]

    @property
    def name(self) -> str:
        return f"{self.family}-{self.variant}{'-perturbed' if self.perturbed else ''}"


def build(family: str, variant: str, root: Path, *, perturbed: bool) -> Served:
    """Convert the tiny ``family`` model with ``variant`` and save it under ``root``.

    Expected tokens: the *base* model's greedy tokens for a checkpoint as converted (what the
    conversion promises), the converted model's own for a perturbed one.
    """
    model = base_model(family)
    expected = greedy(model)
    logprobs = token_logprobs(model, PROMPTS, expected)
    model = hc_retrofit.convert(model, hc_retrofit.HCConfig(num_streams=4, variant=variant))
    if perturbed:
        expected = greedy(perturb(model))
        logprobs = token_logprobs(model, PROMPTS, expected)
    directory = root / f"{family}-{variant}{'-perturbed' if perturbed else ''}"
    hc_retrofit.save_converted(model, directory, word_tokenizer())
    return Served(family, variant, perturbed, directory, expected, logprobs)
