"""Is a model the same function as another? Every check of exactness goes through this module.

It owns the four parts of the question, so that the proof at every conversion
(:func:`hc_retrofit.convert`), ``verify`` (in memory and layer by layer), the streamed convert
(which verifies what it wrote) and the demo answer it the same way:

* **the probe inputs**: :func:`probe_inputs` builds keyword arguments that fit the model (token
  ids, a padded row and two segments for encoders, images for vision models) from
  :func:`probe_ids` (tokenized :data:`PROBE_TEXTS` when a tokenizer is given, else seeded random
  ids); :func:`pad_id` is the one pad-token rule of generation;
* **running a model** on them: :func:`run_probe` gives its full-sequence outputs and, for a model
  that generates, a greedy continuation through the KV cache with the logits of every step;
* **comparing** two runs: :func:`measure` (max |logit difference|, KL of the next-token
  distributions, greedy agreement, and what differs), :func:`compare` (only what differs);
* **the tolerance per dtype**: :data:`TOLERANCES`, the one table every caller reads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hc_retrofit.log import one_line
from hc_retrofit.modeling.errors import HCRetrofitError, UnsupportedArchitectureError
from hc_retrofit.prompt_cache import prompt_cache

PROBE_TEXTS = (
    "Once upon a time, there was a little girl who loved to play outside.",
    "The quick brown fox jumps over the lazy dog, and then it runs into the forest.",
    "In the beginning, the model was exactly the same as before, and nobody could tell.",
    "She looked at the sky and said that tomorrow would be a good day for a long walk.",
)
PROBE_BATCH, PROBE_LENGTH = 2, 8  # the proof at every conversion
CHECKPOINT_BATCH, CHECKPOINT_LENGTH = 4, 16  # verify and inspect (real text when there is a tokenizer)
NEW_TOKENS = 2  # the prefill step and one step that reads the KV cache


@dataclass(frozen=True)
class Tolerance:
    """How far a converted model's outputs may be from the original's, for one compute dtype."""

    atol: float  # absolute part of the logit bound
    rtol: float  # relative part, times the largest |reference logit|
    kl: float  # largest KL(reference || converted) of the next-token distributions, per position

    def limit(self, reference: torch.Tensor) -> float:
        """The largest |logit difference| accepted against ``reference``."""
        return self.atol + self.rtol * float(reference.abs().max())


#: The tolerance per dtype the model computes in. In float32 (and float64) only reassociation
#: differs; in lower precision the model's own rounding differs once streams are mixed, so the
#: relative bound is 4x the dtype's epsilon and the logit bound alone is the criterion (its
#: rounding moves whole distributions, which a KL bound would refuse).
TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float64: Tolerance(atol=1e-4, rtol=1e-4, kl=1e-6),
    torch.float32: Tolerance(atol=1e-4, rtol=1e-4, kl=1e-6),
    torch.bfloat16: Tolerance(atol=1e-4, rtol=4 * torch.finfo(torch.bfloat16).eps, kl=math.inf),
    torch.float16: Tolerance(atol=1e-4, rtol=4 * torch.finfo(torch.float16).eps, kl=math.inf),
}


def tolerance_for(dtype: torch.dtype) -> Tolerance:
    """The :data:`TOLERANCES` entry of ``dtype`` (a dtype not in it is held to the low-precision rule)."""
    if dtype in TOLERANCES:
        return TOLERANCES[dtype]
    return Tolerance(atol=1e-4, rtol=max(1e-4, 4 * torch.finfo(dtype).eps), kl=math.inf)


class NotEquivalentError(HCRetrofitError):
    """A model that must compute its original's function does not (nothing is kept or written)."""


# ----------------------------------------------------------------------------- probe inputs
def vocab_size(model: nn.Module) -> int:
    """The number of token ids ``model`` accepts: its config's ``vocab_size``, at most its embedding table."""
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = getattr(text, "vocab_size", None) or getattr(config, "vocab_size", None)
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and hasattr(embeddings, "num_embeddings"):
        vocab = min(vocab or embeddings.num_embeddings, embeddings.num_embeddings)
    if not vocab:
        raise UnsupportedArchitectureError(f"cannot build a probe batch for {type(model).__name__}: no vocab_size")
    return int(vocab)


def _input_device(model: nn.Module) -> torch.device:
    device = next(model.parameters()).device
    try:
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    except NotImplementedError:  # convolutional image models have no embedding table
        embeddings = None
    if embeddings is not None and isinstance(getattr(embeddings, "weight", None), torch.Tensor):
        device = embeddings.weight.device
    return device


def model_dtype(model: nn.Module) -> torch.dtype:
    """The least precise floating dtype of ``model``'s parameters (what its tolerance is chosen by)."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    return min(dtypes, key=lambda d: torch.finfo(d).bits) if dtypes else torch.float32


def probe_ids(
    model: nn.Module,
    *,
    tokenizer: Any = None,
    texts: Sequence[str] = PROBE_TEXTS,
    vocab: int | None = None,
    batch: int = PROBE_BATCH,
    length: int = PROBE_LENGTH,
    seed: int = 0,
) -> torch.Tensor:
    """``(batch, length)`` token ids on the device of ``model``'s input embeddings.

    With a ``tokenizer``: the first ``batch`` of ``texts`` tokenized and cut to their common length
    (at most ``length``; greedy continuations of text are what users look at), when that is at least
    4 tokens and every id is below the vocabulary. Otherwise seeded random ids from 3 up (below the
    usual pad/bos/eos ids). ``vocab``: a smaller vocabulary to stay within (another model's).
    """
    limit = min(vocab, vocab_size(model)) if vocab else vocab_size(model)
    ids = None
    if tokenizer is not None:
        rows = [tokenizer(text, add_special_tokens=True)["input_ids"] for text in texts[:batch]]
        common = min(length, *(len(r) for r in rows))
        if common >= 4 and all(0 <= t < limit for r in rows for t in r[:common]):
            ids = torch.tensor([r[:common] for r in rows], dtype=torch.long)
    if ids is None:
        generator = torch.Generator().manual_seed(seed)
        ids = torch.randint(min(3, limit - 1), limit, (batch, length), generator=generator)
    return ids.to(_input_device(model))


def _image_size(config: Any) -> tuple[int, int]:
    size = getattr(config, "image_size", None)
    if isinstance(size, int):
        return size, size
    if isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(s, int) for s in size):
        return int(size[0]), int(size[1])
    if isinstance(size, dict) and isinstance(size.get("height"), int) and isinstance(size.get("width"), int):
        return size["height"], size["width"]
    raise UnsupportedArchitectureError(
        f"cannot build a probe batch of images for a {getattr(config, 'model_type', '?')!r} model: "
        "its config has no image_size"
    )


def can_generate(model: nn.Module) -> bool:
    """Whether ``model`` generates text (a causal LM): only then is a cached greedy step part of the check."""
    return getattr(model, "main_input_name", "input_ids") == "input_ids" and bool(
        hasattr(model, "can_generate") and model.can_generate()
    )


def probe_inputs(
    model: nn.Module,
    *,
    tokenizer: Any = None,
    texts: Sequence[str] = PROBE_TEXTS,
    vocab: int | None = None,
    batch: int = PROBE_BATCH,
    length: int = PROBE_LENGTH,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """The probe batch as keyword arguments of ``model``'s forward, by its ``main_input_name``.

    * token models: :func:`probe_ids` and an ``attention_mask``. A model that cannot generate (an
      encoder: BERT, RoBERTa, ...) gets a padded row (the mask hides the last two positions of the
      second row) and, where its config has token types, two segments (``token_type_ids`` 0 then
      1), so that masks and segment embeddings are part of the check. A causal LM gets an all-ones
      mask (its cached greedy continuation is checked instead).
    * image models (ViT, DeiT, ...): seeded ``pixel_values`` of the config's ``image_size`` and
      ``num_channels``.
    """
    main = getattr(model, "main_input_name", "input_ids")
    if main == "pixel_values":
        config = model.config
        height, width = _image_size(config)
        channels = int(getattr(config, "num_channels", 3) or 3)
        pixels = torch.randn(batch, channels, height, width, generator=torch.Generator().manual_seed(seed))
        return {"pixel_values": pixels.to(device=_input_device(model), dtype=model_dtype(model))}
    if main != "input_ids":
        raise UnsupportedArchitectureError(
            f"cannot build a probe batch for {type(model).__name__}: its input is {main!r} "
            "(hc-retrofit proves models that take input_ids or pixel_values)"
        )
    ids = probe_ids(model, tokenizer=tokenizer, texts=texts, vocab=vocab, batch=batch, length=length, seed=seed)
    mask = torch.ones_like(ids)
    inputs = {"input_ids": ids, "attention_mask": mask}
    if not can_generate(model):
        if ids.shape[0] > 1 and ids.shape[1] > 3:
            mask[1, -2:] = 0
        if int(getattr(model.config, "type_vocab_size", 0) or 0) > 1:
            types = torch.zeros_like(ids)
            types[:, ids.shape[1] // 2 :] = 1
            inputs["token_type_ids"] = types
    return inputs


def pad_id(model: nn.Module) -> int:
    """The pad id greedy generation uses: the generation config's pad id, else the model config's,
    else their EOS id in the same order (the first of a list), else 0."""
    for name in ("pad_token_id", "eos_token_id"):
        for source in (getattr(model, "generation_config", None), model.config):
            value = getattr(source, name, None) if source is not None else None
            if isinstance(value, list) and value:
                value = value[0]
            if isinstance(value, int):
                return value
    return 0


# ----------------------------------------------------------------------------- running
@dataclass
class ProbeOutputs:
    """What a model computes on the probe batch."""

    logits: torch.Tensor  # float32: a head's logits, else the hidden states (see ``is_logits``)
    tokens: torch.Tensor | None = None  # greedy continuation (through the KV cache)
    step_logits: tuple[torch.Tensor, ...] | None = None  # raw logits of each generated step
    cache_note: str = ""  # why the cached check was skipped, if it was
    is_logits: bool = True  # ``logits`` are a head's logits (so their distributions can be compared)


def _main_output(output: Any) -> tuple[torch.Tensor, bool]:
    """The output compared: ``logits`` (LM / classification heads), else the first tensor
    (``last_hidden_state`` of a base model), with a base model's ``pooler_output`` appended."""
    if hasattr(output, "logits") and output.logits is not None:
        return output.logits.detach().float(), True
    first = output[0].detach().float()
    pooled = getattr(output, "pooler_output", None)
    if isinstance(pooled, torch.Tensor) and pooled.shape[0] == first.shape[0]:
        return torch.cat([first.flatten(1), pooled.detach().float().flatten(1)], dim=1), False
    return first, False


def _greedy(
    model: nn.Module, inputs: dict[str, torch.Tensor], new_tokens: int, out: ProbeOutputs, **cache: Any
) -> None:
    """Fill ``out.tokens`` and ``out.step_logits`` with ``model``'s greedy continuation of the probe
    (``cache``: the prompt but its last position, already in the KV cache, see :func:`~hc_retrofit.prompt_cache.prompt_cache`)."""
    ids = inputs["input_ids"]
    try:
        gen = model.generate(
            ids,
            attention_mask=inputs.get("attention_mask"),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            num_beams=1,
            use_cache=True,
            pad_token_id=pad_id(model),
            return_dict_in_generate=True,
            output_logits=True,
            **cache,
        )
    except Exception as err:  # the original may not generate; the converted one is then held to that
        if cache:  # the cache could not be continued: the whole prompt again
            return _greedy(model, inputs, new_tokens, out)
        out.cache_note = f"generate() failed: {one_line(err)}"
    else:
        out.tokens = gen.sequences[:, ids.shape[1] :]
        out.step_logits = tuple(step.detach().float() for step in gen.logits)
    return None


@torch.no_grad()
def run_probe(
    model: nn.Module,
    inputs: torch.Tensor | dict[str, torch.Tensor],
    *,
    new_tokens: int = NEW_TOKENS,
    check_cache: bool = True,
) -> ProbeOutputs:
    """``model``'s outputs on ``inputs`` (token ids, or the keyword arguments of :func:`probe_inputs`)
    and, for a model that generates, its ``new_tokens`` greedy tokens after them through its cache.

    Runs in eval mode (no dropout) and puts every module's train/eval flag back afterwards.
    """
    if isinstance(inputs, torch.Tensor):
        inputs = {"input_ids": inputs, "attention_mask": torch.ones_like(inputs)}
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        output = model(**inputs)
        logits, is_logits = _main_output(output)
        out = ProbeOutputs(logits, is_logits=is_logits)
        if not check_cache:
            out.cache_note = "not checked"
        elif not can_generate(model) or "input_ids" not in inputs:
            out.cache_note = f"{type(model).__name__} cannot generate"
        else:
            _greedy(model, inputs, new_tokens, out, **prompt_cache(output, inputs["input_ids"].shape[1] - 1))
        return out
    finally:
        for module, training in modes:
            module.training = training


# ----------------------------------------------------------------------------- comparing
@dataclass(frozen=True)
class Comparison:
    """How a model's probe outputs compare with a reference's, and whether they are the same function."""

    max_abs_logit_diff: float
    logit_tolerance: float
    mean_kl: float | None  # KL(reference || other) of the next-token distributions (None: not logits)
    max_kl: float | None
    kl_tolerance: float
    greedy_agreement: float  # fraction of greedy tokens that agree (1.0 when the reference has none)
    greedy_identical: bool
    problem: str | None  # what differs (one short phrase); None: equivalent

    @property
    def equivalent(self) -> bool:
        """Same function within the dtype's tolerance: outputs, distributions, greedy tokens, cached steps."""
        return self.problem is None


def kl_divergence(reference: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """KL(reference || other) of the softmax of two logit tensors, per position, in float64."""
    p = torch.log_softmax(reference.double(), dim=-1)
    q = torch.log_softmax(other.double(), dim=-1)
    return (p.exp() * (p - q)).sum(-1).clamp_min(0.0)


def _greedy_agreement(reference: ProbeOutputs, got: ProbeOutputs) -> float:
    if reference.tokens is None:
        return 1.0
    if got.tokens is None or got.tokens.shape != reference.tokens.shape:
        return 0.0
    return float((got.tokens == reference.tokens).float().mean())


def _problem(
    reference: ProbeOutputs, got: ProbeOutputs, tol: Tolerance, diff: float, max_kl: float | None
) -> str | None:
    """What differs between two runs of the probe (first of: outputs, distributions, tokens, cached steps)."""
    limit = tol.limit(reference.logits)
    if not diff <= limit:  # also catches NaN
        return f"max |logit diff| {diff:.3g} > {limit:.3g}"
    if max_kl is not None and not max_kl <= tol.kl:
        return f"max KL {max_kl:.3g} > {tol.kl:.3g}"
    if reference.tokens is None:
        return None
    if got.tokens is None:
        return f"cached decoding: {got.cache_note}"
    if not torch.equal(got.tokens, reference.tokens):
        return "a different greedy continuation through the KV cache"
    for step, (ref, new) in enumerate(zip(reference.step_logits or (), got.step_logits or (), strict=True)):
        step_diff, step_limit = float((new - ref).abs().max()), tol.limit(ref)
        if not step_diff <= step_limit:
            return f"cached decode step {step}: max |logit diff| {step_diff:.3g} > {step_limit:.3g}"
    return None


def measure(reference: ProbeOutputs, got: ProbeOutputs, dtype: torch.dtype) -> Comparison:
    """Compare ``got`` with ``reference`` under the tolerance of ``dtype`` (the dtype the models compute in)."""
    tol = tolerance_for(dtype)
    if got.logits.shape != reference.logits.shape:
        problem = f"logits shape {tuple(got.logits.shape)} instead of {tuple(reference.logits.shape)}"
        return Comparison(math.inf, tol.limit(reference.logits), None, None, tol.kl, 0.0, False, problem)
    diff = float((got.logits - reference.logits).abs().max())
    kl = kl_divergence(reference.logits, got.logits) if reference.is_logits and got.is_logits else None
    mean_kl, max_kl = (float(kl.mean()), float(kl.max())) if kl is not None else (None, None)
    agreement = _greedy_agreement(reference, got)
    return Comparison(
        max_abs_logit_diff=diff,
        logit_tolerance=tol.limit(reference.logits),
        mean_kl=mean_kl,
        max_kl=max_kl,
        kl_tolerance=tol.kl,
        greedy_agreement=agreement,
        greedy_identical=reference.tokens is None or agreement == 1.0,
        problem=_problem(reference, got, tol, diff, max_kl),
    )


def compare(reference: ProbeOutputs, got: ProbeOutputs, dtype: torch.dtype) -> str | None:
    """``None`` if ``got`` matches ``reference`` within the tolerance of ``dtype``, else what differs."""
    return measure(reference, got, dtype).problem


def require_equivalent(reference: ProbeOutputs, got: ProbeOutputs, dtype: torch.dtype, what: str) -> Comparison:
    """:func:`measure`, raising :class:`NotEquivalentError` (naming ``what``) unless equivalent."""
    comparison = measure(reference, got, dtype)
    if not comparison.equivalent:
        raise NotEquivalentError(f"{what} is not equivalent to its original: {comparison.problem}")
    return comparison
