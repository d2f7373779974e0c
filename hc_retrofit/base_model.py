"""Loading the plain transformers models (and their tokenizers) that conversions start from."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from hc_retrofit.checkpoint_format import (
    CONFIG_KEY,
    TOKENIZER_FILES,
    check_weight_files,
    is_converted_dir,
    read_config_dict,
)
from hc_retrofit.dtypes import parse_dtype
from hc_retrofit.finite_weights import first_nonfinite_tensor, refuse_nonfinite
from hc_retrofit.log import first_line
from hc_retrofit.modeling.errors import AlreadyConvertedError, CheckpointError
from hc_retrofit.repo_ids import check_repo_id, looks_like_path
from hc_retrofit.runtime_classes import converted_config


def load_base_config(model_id_or_dir: str, *, revision: str | None = None, trust_remote_code: bool = False) -> Any:
    """The transformers config of a base model (local dir, Hub id or cached Hub id), with clear errors."""
    from transformers import AutoConfig

    name = str(model_id_or_dir)
    local = Path(name).expanduser()
    if local.exists():
        data = read_config_dict(local)
        if isinstance(data.get(CONFIG_KEY), dict):
            raise AlreadyConvertedError(
                f"{name} is already a converted hc-retrofit checkpoint; start from its base model"
            )
    elif looks_like_path(name):
        raise CheckpointError(f"{name}: no such directory")
    else:
        check_repo_id(name)
    try:
        config = AutoConfig.from_pretrained(
            str(local) if local.exists() else name, revision=revision, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as err:
        if local.exists():
            raise CheckpointError(f"cannot read the config of {name}: {first_line(err)}") from err
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            raise CheckpointError(
                f"cannot load {name!r}: it is not a local directory, and it is not in the Hugging Face cache "
                "(HF_HUB_OFFLINE=1 is set); pass a local checkpoint directory, or download the model first"
            ) from err
        raise CheckpointError(
            f"cannot load {name!r}: it is not a local directory, and the Hugging Face Hub did not provide it "
            f"({first_line(err)}); pass a local checkpoint directory, or set HF_HUB_OFFLINE=1 to use a model "
            "already in the Hugging Face cache"
        ) from err
    if getattr(config, CONFIG_KEY, None):
        raise AlreadyConvertedError(f"{name} is already a converted hc-retrofit checkpoint; start from its base model")
    return config


def load_tokenizer(model_id_or_dir: str, *, revision: str | None = None, trust_remote_code: bool = False) -> Any:
    """The tokenizer saved with a model, or ``None`` when it has none (tokenizers are optional here)."""
    from transformers import AutoTokenizer

    local = Path(model_id_or_dir).expanduser()
    name = str(local) if local.exists() else model_id_or_dir
    if local.is_dir() and not any((local / f).is_file() for f in TOKENIZER_FILES):
        return None
    extra: dict[str, Any] = {}
    with contextlib.suppress(Exception):  # no or unreadable tokenizer files: go on without one
        if is_converted_dir(local):  # give AutoTokenizer the config: it cannot read our model_type itself
            extra["config"] = converted_config(local)
        tokenizer = AutoTokenizer.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code, **extra)
        if (tokenizer.vocab_size or 0) > 0:  # some classes build an empty tokenizer when the files are missing
            return tokenizer
    return None


def _check_causal_lm_config(config: Any, name: str) -> None:
    """Refuse, in one line, a model with no causal-LM class (an encoder, a vision model) before loading it."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING or "AutoModelForCausalLM" in (
        getattr(config, "auto_map", None) or {}
    ):
        return
    raise CheckpointError(
        f"{name} is a {config.model_type!r} model, which has no causal-LM class: the command line converts and "
        "trains causal LMs; convert encoders and vision models in Python (hc_retrofit.convert, then save_converted)"
    )


def check_base_load_report(info: dict[str, Any], name: str, config: Any) -> None:
    """Refuse a base whose weights do not match its config (one line): any tensor the model has that the
    checkpoint lacks (it would be random), any the checkpoint has that the model does not use, any of
    another shape. An edited ``model_type`` loads another family's classes and shows here."""
    problems = []
    for key, what in (
        ("missing_keys", "missing (would be random)"),
        ("unexpected_keys", "unused"),
        ("mismatched_keys", "of another shape"),
    ):
        names = sorted(str(k if isinstance(k, str) else k[0]) for k in info.get(key) or ())
        if names:
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            problems.append(f"{len(names)} tensors {what}: {shown}")
    if problems:
        raise CheckpointError(
            f"{name}: its weights do not match its config.json (model_type {config.model_type!r}): "
            f"{'; '.join(problems)}; was config.json edited? restore it, or pass the right checkpoint"
        )


def load_base_model(
    model_id_or_dir: str,
    *,
    revision: str | None = None,
    dtype: str | torch.dtype | None = "auto",
    trust_remote_code: bool = False,
) -> tuple[Any, Any]:
    """Load a plain causal LM and its tokenizer (or ``None``) through transformers' Hub/cache code.

    Raises :class:`CheckpointError` (one line, with the fix) for an unknown id, an unreachable Hub,
    or a directory that is not a checkpoint; :class:`AlreadyConvertedError` for a converted one.
    """
    from transformers import AutoModelForCausalLM

    torch_dtype = parse_dtype(dtype)
    config = load_base_config(model_id_or_dir, revision=revision, trust_remote_code=trust_remote_code)
    _check_causal_lm_config(config, model_id_or_dir)
    local = Path(model_id_or_dir).expanduser()
    name = str(local) if local.exists() else str(model_id_or_dir)
    if local.is_dir():
        check_weight_files(local)
    from transformers.utils import logging as transformers_logging

    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # its load report: checked below and said in one line
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            name,
            config=config,
            revision=revision,
            dtype=torch_dtype,
            trust_remote_code=trust_remote_code,
            output_loading_info=True,
        )
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot load the weights of {model_id_or_dir}: {first_line(err)}") from err
    except RuntimeError as err:  # transformers raises on shapes that disagree with config.json
        raise CheckpointError(
            f"{model_id_or_dir}: its weights do not match its config.json ({first_line(err)[:160]}); was the config "
            "edited? restore it"
        ) from err
    finally:
        transformers_logging.set_verbosity(verbosity)
    check_base_load_report(info, model_id_or_dir, config)
    refuse_nonfinite(model_id_or_dir, first_nonfinite_tensor(model))
    tokenizer = load_tokenizer(model_id_or_dir, revision=revision, trust_remote_code=trust_remote_code)
    return model.eval(), tokenizer
