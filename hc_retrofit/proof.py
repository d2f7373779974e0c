"""`convert`: retrofit a loaded model and prove the result exact before returning it.

A wrong model is the one unforgivable bug, so no adapter is trusted (hand-written or discovered):
the original model is run on a small probe batch first (full-sequence logits, plus a two-token
greedy ``generate()`` through the KV cache where the model can generate), then each candidate
adapter is applied with :func:`hc_retrofit.modeling.patch.apply_family` and the probe is run again. The first
candidate whose logits agree (fp32 tolerance; tokens identical) is kept and its structure is
recorded in ``config.hc_retrofit_structure`` (so saved checkpoints rebuild exactly that structure).
A candidate that is not exact, or fails, is undone -- every module gets back its class, attributes,
submodules, parameters, buffers and hooks -- and the next one is tried. When none is exact the
model is left exactly as it was and :class:`UnsupportedArchitectureError` names the family and
every structure tried.

No copy of the model is made: the reference outputs are kept, not the reference model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hc_retrofit.discovery import discover
from hc_retrofit.modeling.config import HCConfig
from hc_retrofit.modeling.errors import HCRetrofitError, UnsupportedArchitectureError
from hc_retrofit.modeling.families import FAMILIES, Family
from hc_retrofit.modeling.patch import apply_family, check_convertible, remove_hyper_connections

LOGIT_ATOL = 1e-4
LOGIT_RTOL = 1e-4
PROBE_BATCH = 2
PROBE_LENGTH = 8
NEW_TOKENS = 2  # the prefill step and one step that reads the KV cache


@dataclass
class ProbeOutputs:
    """What a model computes on the probe batch."""

    logits: torch.Tensor
    tokens: torch.Tensor | None = None  # greedy continuation (through the KV cache)
    step_logits: tuple[torch.Tensor, ...] | None = None  # raw logits of each generated step
    cache_note: str = ""  # why the cached check was skipped, if it was


def _vocab_size(model: nn.Module) -> int:
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = getattr(text, "vocab_size", None) or getattr(config, "vocab_size", None)
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and hasattr(embeddings, "num_embeddings"):
        vocab = min(vocab or embeddings.num_embeddings, embeddings.num_embeddings)
    if not vocab:
        raise UnsupportedArchitectureError(f"cannot build a probe batch for {type(model).__name__}: no vocab_size")
    return int(vocab)


def probe_ids(model: nn.Module, *, batch: int = PROBE_BATCH, length: int = PROBE_LENGTH, seed: int = 0) -> torch.Tensor:
    """Seeded random token ids (no special ids below 3), on the device of the input embeddings."""
    vocab = _vocab_size(model)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(min(3, vocab - 1), vocab, (batch, length), generator=generator)
    return ids.to(_input_device(model))


def _input_device(model: nn.Module) -> torch.device:
    device = next(model.parameters()).device
    try:
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    except NotImplementedError:  # convolutional image models have no embedding table
        embeddings = None
    if embeddings is not None and isinstance(getattr(embeddings, "weight", None), torch.Tensor):
        device = embeddings.weight.device
    return device


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
    """Whether ``model`` generates text (a causal LM): only then is a cached greedy step part of the proof."""
    return getattr(model, "main_input_name", "input_ids") == "input_ids" and bool(
        hasattr(model, "can_generate") and model.can_generate()
    )


def probe_inputs(
    model: nn.Module, *, batch: int = PROBE_BATCH, length: int = PROBE_LENGTH, seed: int = 0
) -> dict[str, torch.Tensor]:
    """The probe batch as keyword arguments of ``model``'s forward, by its ``main_input_name``.

    * token models: seeded random ``input_ids`` and an ``attention_mask``. A model that cannot
      generate (an encoder: BERT, RoBERTa, ...) gets a padded row (the mask hides the last two
      positions of the second row) and, where its config has token types, two segments
      (``token_type_ids`` 0 then 1), so that masks and segment embeddings are part of the proof.
      A causal LM gets an all-ones mask (its cached greedy step is checked instead).
    * image models (ViT, DeiT, ...): seeded ``pixel_values`` of the config's ``image_size`` and
      ``num_channels``.
    """
    main = getattr(model, "main_input_name", "input_ids")
    generator = torch.Generator().manual_seed(seed)
    if main == "pixel_values":
        config = model.config
        height, width = _image_size(config)
        channels = int(getattr(config, "num_channels", 3) or 3)
        dtype = _model_dtype(model)
        pixels = torch.randn(batch, channels, height, width, generator=generator)
        return {"pixel_values": pixels.to(device=_input_device(model), dtype=dtype)}
    if main != "input_ids":
        raise UnsupportedArchitectureError(
            f"cannot build a probe batch for {type(model).__name__}: its input is {main!r} "
            "(hc-retrofit proves models that take input_ids or pixel_values)"
        )
    ids = probe_ids(model, batch=batch, length=length, seed=seed)
    mask = torch.ones_like(ids)
    inputs = {"input_ids": ids, "attention_mask": mask}
    if not can_generate(model):
        if batch > 1 and length > 3:
            mask[1, -2:] = 0
        if int(getattr(model.config, "type_vocab_size", 0) or 0) > 1:
            types = torch.zeros_like(ids)
            types[:, length // 2 :] = 1
            inputs["token_type_ids"] = types
    return inputs


def _pad_id(model: nn.Module) -> int:
    for source in (getattr(model, "generation_config", None), model.config):
        for name in ("pad_token_id", "eos_token_id"):
            value = getattr(source, name, None) if source is not None else None
            if isinstance(value, list) and value:
                value = value[0]
            if isinstance(value, int):
                return value
    return 0


def _logits(output: Any) -> torch.Tensor:
    """The output the proof compares: ``logits`` (LM / classification heads), else the first tensor
    (``last_hidden_state`` of a base model), with a base model's ``pooler_output`` appended."""
    if hasattr(output, "logits") and output.logits is not None:
        return output.logits.detach().float()
    first = output[0].detach().float()
    pooled = getattr(output, "pooler_output", None)
    if isinstance(pooled, torch.Tensor) and pooled.shape[0] == first.shape[0]:
        return torch.cat([first.flatten(1), pooled.detach().float().flatten(1)], dim=1)
    return first


@torch.no_grad()
def run_probe(
    model: nn.Module, inputs: torch.Tensor | dict[str, torch.Tensor], *, check_cache: bool = True
) -> ProbeOutputs:
    """The model's logits on ``inputs`` (token ids, or the keyword arguments of
    :func:`probe_inputs`) and, for a causal LM, a greedy continuation through its cache.

    Runs in eval mode (no dropout) and puts every module's train/eval flag back afterwards.
    """
    if isinstance(inputs, torch.Tensor):
        inputs = {"input_ids": inputs, "attention_mask": torch.ones_like(inputs)}
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        out = ProbeOutputs(_logits(model(**inputs)))
        if not check_cache:
            out.cache_note = "not checked"
        elif not can_generate(model) or "input_ids" not in inputs:
            out.cache_note = f"{type(model).__name__} cannot generate"
        else:
            ids, mask = inputs["input_ids"], inputs.get("attention_mask")
            try:
                gen = model.generate(
                    ids,
                    attention_mask=mask,
                    max_new_tokens=NEW_TOKENS,
                    min_new_tokens=NEW_TOKENS,
                    do_sample=False,
                    num_beams=1,
                    use_cache=True,
                    pad_token_id=_pad_id(model),
                    return_dict_in_generate=True,
                    output_logits=True,
                )
            except Exception as err:  # the original may not generate; the converted one is then held to that
                out.cache_note = f"generate() failed: {_one_line(err)}"
            else:
                out.tokens = gen.sequences[:, ids.shape[1] :]
                out.step_logits = tuple(step.detach().float() for step in gen.logits)
        return out
    finally:
        for module, training in modes:
            module.training = training


def tolerance(reference: torch.Tensor, dtype: torch.dtype) -> float:
    """The largest |logit difference| accepted: fp32 tolerance, widened by the dtype's rounding when
    the model computes in lower precision (its own rounding differs once streams are mixed)."""
    rtol = LOGIT_RTOL if dtype in (torch.float32, torch.float64) else max(LOGIT_RTOL, 4 * torch.finfo(dtype).eps)
    return LOGIT_ATOL + rtol * float(reference.abs().max())


def compare(reference: ProbeOutputs, got: ProbeOutputs, dtype: torch.dtype) -> str | None:
    """``None`` if ``got`` matches ``reference``, else what differs (one short phrase)."""
    if got.logits.shape != reference.logits.shape:
        return f"logits shape {tuple(got.logits.shape)} instead of {tuple(reference.logits.shape)}"
    diff = float((got.logits - reference.logits).abs().max())
    tol = tolerance(reference.logits, dtype)
    if not diff <= tol:  # also catches NaN
        return f"max |logit diff| {diff:.3g} > {tol:.3g}"
    if reference.tokens is None:
        return None
    if got.tokens is None:
        return f"cached decoding: {got.cache_note}"
    if not torch.equal(got.tokens, reference.tokens):
        return "a different greedy continuation through the KV cache"
    for step, (ref, new) in enumerate(zip(reference.step_logits or (), got.step_logits or (), strict=True)):
        diff = float((new - ref).abs().max())
        tol = tolerance(ref, dtype)
        if not diff <= tol:
            return f"cached decode step {step}: max |logit diff| {diff:.3g} > {tol:.3g}"
    return None


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:200]}"


def _model_dtype(model: nn.Module) -> torch.dtype:
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    return min(dtypes, key=lambda d: torch.finfo(d).bits) if dtypes else torch.float32


def _candidates(
    model: nn.Module, family: Family | None, inputs: dict[str, torch.Tensor]
) -> tuple[list[Family], list[str]]:
    """The adapters to try, in order: the one given; else the hand-written one for the model type
    (if any), then the ones discovered from the model itself. Plus notes on what discovery skipped."""
    if family is not None:
        return [family], []
    model_type = getattr(model.config, "model_type", None)
    known = [FAMILIES[model_type]] if model_type in FAMILIES else []
    discovered, notes = discover(model, inputs)
    seen = [f.to_dict(model.config) for f in known]
    return known + [f for f in discovered if f.to_dict(model.config) not in seen], notes


def convert(model: nn.Module, config: HCConfig | None = None, *, family: Family | None = None) -> nn.Module:
    """Retrofit hyper-connections into ``model`` (in place), prove it exact, and return it.

    ``model`` is a loaded transformers causal LM. ``family`` (default: the hand-written adapter
    of ``config.model_type``) says where the hyper-connection sites go. Before returning, the
    converted model is compared with the original on a probe batch (logits within fp32 tolerance,
    and the same greedy tokens and logits through the KV cache where the model can generate).

    Raises:
        UnsupportedArchitectureError: no adapter, or no adapter is exact; ``model`` is unchanged.
        AlreadyConvertedError: ``model`` was converted before.
        ConfigError: invalid settings.
    """
    config = check_convertible(model, config)
    model_type = getattr(model.config, "model_type", type(model).__name__)
    if any(p.is_meta for p in model.parameters()):
        raise UnsupportedArchitectureError(
            f"this {model_type!r} model has weights on the meta device, so the conversion cannot be checked; "
            "load the weights first"
        )
    inputs = probe_inputs(model)
    reference = run_probe(model, inputs)
    candidates, notes = _candidates(model, family, inputs)
    dtype = _model_dtype(model)
    tried: list[str] = list(notes)
    for candidate in candidates:
        outcome = _try(model, config, candidate, inputs, reference, dtype)
        if outcome is None:  # apply_family recorded the structure in config.hc_retrofit_structure
            return model
        tried.append(f"{candidate.describe(model.config)} ({outcome})")
    raise UnsupportedArchitectureError(
        f"cannot convert {model_type!r} exactly, the model is unchanged; tried {len(tried)}: "
        + "; ".join(tried)
        + "; a hand-written hc_retrofit.Family (register_family, or convert(..., family=...)) may fit it"
    )


def _try(
    model: nn.Module,
    config: HCConfig,
    family: Family,
    inputs: dict[str, torch.Tensor],
    reference: ProbeOutputs,
    dtype: torch.dtype,
) -> str | None:
    """Apply ``family`` and probe: ``None`` if exact (the model stays converted), else why not
    (the model is restored)."""
    try:
        apply_family(model, config, family=family)
        problem = compare(reference, run_probe(model, inputs, check_cache=reference.tokens is not None), dtype)
    except HCRetrofitError as err:
        remove_hyper_connections(model)
        if not isinstance(err, UnsupportedArchitectureError):
            raise
        return str(err)
    except Exception as err:  # a wrong adapter can fail in any way: that is a refusal, not a crash
        remove_hyper_connections(model)
        return f"failed: {_one_line(err)}"
    except BaseException:  # Ctrl-C: leave the model as it was
        remove_hyper_connections(model)
        raise
    if problem is not None:
        remove_hyper_connections(model)
    return problem
