"""Get the model to train: a converted directory as is, or a plain model converted on the fly.

``--no-hc`` loads the same plain model and trains it unchanged through the same pipeline, so an
HC-vs-plain comparison differs only in the hyper-connections. Weights are loaded in float32 by
default (``model_dtype``): they are the optimiser's master weights, and mixed precision (bf16
autocast, or FSDP's compute dtype) lowers only the compute.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from hc_retrofit.log import get_logger
from hc_retrofit.modeling.patch import is_converted
from hc_retrofit.proof import convert  # proven exact on a probe batch (and discovered for any family)
from hc_retrofit.tasks import is_causal_lm, sees_future_tokens
from hc_retrofit.train.errors import TrainingError
from hc_retrofit.train.recipe import TrainConfig

log = get_logger(__name__)

TRAIN_DTYPES = ("float32", "bfloat16")
"""The :data:`hc_retrofit.dtypes.DTYPES` a model may be trained in (its weights are the optimiser's)."""


def resolve_dtype(name: str) -> torch.dtype:
    """``model_dtype`` (a :data:`TRAIN_DTYPES` name or its alias, e.g. ``bf16``) -> the torch dtype."""
    from hc_retrofit.dtypes import DTYPE_ALIASES, DTYPES

    canonical = DTYPE_ALIASES.get(name, name)
    if canonical not in TRAIN_DTYPES:
        raise TrainingError(f"model_dtype must be one of {', '.join(TRAIN_DTYPES)}, got {name!r}")
    return DTYPES[canonical]


def load_model(cfg: TrainConfig) -> tuple[nn.Module, Any]:
    """Load ``cfg.model`` (converted dir, local plain model or Hub id) and its tokenizer."""
    from hc_retrofit.base_model import load_base_model, load_tokenizer
    from hc_retrofit.checkpoint_format import is_converted_dir
    from hc_retrofit.loading import load_converted

    if not cfg.model:
        raise TrainingError("no model given: pass MODEL_OR_DIR (or set `model:` in the recipe)")
    dtype = resolve_dtype(cfg.model_dtype)
    if is_converted_dir(cfg.model):
        model = load_converted(cfg.model, dtype=dtype)
        return model, load_tokenizer(cfg.model)  # with our config: never asks to run checkpoint code
    return load_base_model(cfg.model, revision=cfg.revision, dtype=dtype, trust_remote_code=cfg.trust_remote_code)


def prepare_model(cfg: TrainConfig, model: nn.Module, tokenizer: Any) -> nn.Module:
    """Convert (unless ``no_hc``), set up gradient checkpointing, and check the pair is trainable."""
    if not is_causal_lm(model):
        raise TrainingError(
            f"{cfg.model or type(model).__name__} is a {type(model).__name__}, not a causal LM: hc-retrofit trains "
            "causal LMs only (encoders and vision models convert, save and load with the Python API)"
        )
    if sees_future_tokens(model):
        raise TrainingError(
            f"{cfg.model or type(model).__name__} ({type(model).__name__}) attends to later tokens, so a next-token "
            "loss would let it copy the answer: hc-retrofit trains causal LMs only (set is_decoder=True in the "
            "config of an encoder meant as a decoder)"
        )
    if tokenizer is None:
        raise TrainingError(
            f"no tokenizer found for {cfg.model or type(model).__name__}: training tokenises the data with the "
            "model's tokenizer, so save one beside the weights"
        )
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for attr in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        limit = getattr(config, attr, None)
        if isinstance(limit, int) and limit > 0:
            if cfg.block_size > limit:
                raise TrainingError(
                    f"--block-size {cfg.block_size} is longer than the model's {limit} positions ({attr}); "
                    f"pass --block-size {limit} or less"
                )
            break
    if cfg.no_hc and is_converted(model):
        raise TrainingError(
            "--no-hc trains the plain model, but this model already has hyper-connections: pass the base model"
        )
    if not cfg.no_hc and not is_converted(model):
        convert(model, cfg.hc_config())
    elif is_converted(model) and (cfg.streams, cfg.variant) != (model.hc_config.num_streams, model.hc_config.variant):
        log.warning(
            "the model is already converted (%s, %d streams); the streams/variant settings (%s, %d) apply only when "
            "converting a plain model and are not used",
            model.hc_config.variant,
            model.hc_config.num_streams,
            cfg.variant,
            cfg.streams,
        )
    if cfg.grad_checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:  # pragma: no cover - older 5.x
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False  # no KV cache while training (and it conflicts with checkpointing)
    return model.train()


def save_final(model: nn.Module, tokenizer: Any, out_dir: Path, *, metadata: dict[str, Any]) -> Path:
    """Write the trained model: converted-checkpoint format if it has HC, else ``save_pretrained``."""
    if is_converted(model):
        from hc_retrofit.saving import save_converted

        return Path(save_converted(model, out_dir, tokenizer, overwrite=True, extra_metadata=metadata))
    from hc_retrofit import outputs

    model.config.use_cache = True
    with outputs.staged(out_dir, kind="checkpoint") as tmp:  # sealed with a manifest of what it wrote
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out_dir
