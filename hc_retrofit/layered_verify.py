"""``verify`` layer by layer: the base and the converted model run one after the other, each with
one decoder layer in memory at a time (:mod:`hc_retrofit.layered`), so that a checkpoint larger
than the memory is verified with the same numbers as the in-memory path.

The models are built as ``from_pretrained`` builds them (the same classes, configs, generation
configs and float32 weights), only with their parameters read per layer instead of up front.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from hc_retrofit.base_model import load_base_config, load_tokenizer
from hc_retrofit.checkpoint_format import check_weight_files
from hc_retrofit.checkpoint_source import resolve_checkpoint
from hc_retrofit.equivalence import CHECKPOINT_BATCH, CHECKPOINT_LENGTH, ProbeOutputs, probe_inputs, run_probe
from hc_retrofit.layered import LayeredUnavailable, LayerLoader, build_weightless, stored_tensors
from hc_retrofit.loading import build_float32
from hc_retrofit.modeling.errors import CheckpointError, HCRetrofitError
from hc_retrofit.modeling.families import family_for
from hc_retrofit.modeling.patch import decoder_layers
from hc_retrofit.runtime_classes import converted_classes, converted_config


def _generation_config(model: Any, directory: Path) -> None:
    """What ``from_pretrained`` gives the model: the directory's ``generation_config.json`` if any."""
    from transformers import GenerationConfig

    if model.can_generate() and (directory / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(directory)


def _float(dtype: torch.dtype | None) -> Callable[[str, torch.Tensor], torch.Tensor]:
    """Checkpoint tensor -> what the in-memory verify holds: loaded in ``dtype`` (if given), then float32."""

    def cast(_name: str, tensor: torch.Tensor) -> torch.Tensor:
        if not tensor.is_floating_point():
            return tensor
        if dtype is not None:
            tensor = tensor.to(dtype)
        return tensor.to(torch.float32)

    return cast


def _base_model(base: str, revision: str | None, base_dtype: torch.dtype | None) -> tuple[Any, LayerLoader]:
    from transformers import AutoModelForCausalLM

    config = load_base_config(base, revision=revision)
    if getattr(config, "auto_map", None):
        raise LayeredUnavailable(f"{base} uses its own modeling code (auto_map)")
    local = resolve_checkpoint(base, revision=revision)
    check_weight_files(local)
    model = build_weightless(lambda: AutoModelForCausalLM.from_config(config, dtype=torch.float32))
    if base_dtype in (torch.float16, torch.bfloat16) and (
        getattr(model, "_keep_in_fp32_modules", None) or getattr(model, "_keep_in_fp32_modules_strict", None)
    ):
        raise LayeredUnavailable(f"{type(model).__name__} keeps some modules in float32 when loaded in {base_dtype}")
    _generation_config(model, local)
    loader = LayerLoader(
        model, decoder_layers(model, family_for(config)), stored_tensors(local), _float(base_dtype), source=base
    )
    return model.eval(), loader


def _converted_skeleton(directory: Path) -> Any:
    """The converted model with weightless parameters (what ``load_converted`` builds, before loading)."""
    check_weight_files(directory)
    config = converted_config(directory)
    _, model_cls = converted_classes(directory)
    model = build_weightless(lambda: build_float32(model_cls, config))
    _generation_config(model, directory)
    return model.eval()


def _converted_loader(model: Any, directory: Path) -> LayerLoader:
    return LayerLoader(
        model, decoder_layers(model), stored_tensors(directory), _float(None), source=str(directory), strict=True
    )


@torch.no_grad()
def layered_outputs(
    converted_dir: str | os.PathLike,
    base: str,
    *,
    revision: str | None,
    base_dtype: torch.dtype | None,
    new_tokens: int,
    base_failed: Callable[[HCRetrofitError], HCRetrofitError | None] = lambda _err: None,
    check_converted: Callable[[Any], None] = lambda _model: None,
) -> tuple[Any, dict[str, torch.Tensor], ProbeOutputs, ProbeOutputs]:
    """``(converted model (meta weights), probe inputs, base outputs, converted outputs)``: the probe
    and the runs of :mod:`hc_retrofit.equivalence`, exactly as the in-memory verify does.
    ``base_failed(err)``: the error to raise instead when the base cannot be loaded (``None``: ``err``);
    ``check_converted(model)``: runs on the weightless converted model first (it raises to refuse)."""
    directory = Path(converted_dir)
    converted = _converted_skeleton(directory)
    check_converted(converted)  # e.g. a causal LM: refused before anything runs
    try:
        base_model, loader = _base_model(base, revision, base_dtype)
    except LayeredUnavailable as why:
        raise CheckpointError(
            f"cannot verify layer by layer: {why}; verify in memory (--mode memory) on a machine that holds both models"
        ) from why
    except HCRetrofitError as err:
        named = base_failed(err)
        if named is None:
            raise
        raise named from err
    tokenizer = load_tokenizer(base, revision=revision) or load_tokenizer(str(directory))
    config = converted_config(directory)
    inputs = probe_inputs(
        base_model, tokenizer=tokenizer, vocab=config.vocab_size, batch=CHECKPOINT_BATCH, length=CHECKPOINT_LENGTH
    )
    reference = run_probe(base_model, inputs, new_tokens=new_tokens)
    loader.close()
    del base_model, loader
    gc.collect()
    try:
        loader = _converted_loader(converted, directory)
    except LayeredUnavailable as why:
        raise CheckpointError(f"cannot verify {directory} layer by layer: {why}") from why
    outputs = run_probe(converted, inputs, new_tokens=new_tokens)
    loader.close()
    return converted, inputs, reference, outputs
