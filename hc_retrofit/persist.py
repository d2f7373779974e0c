"""Saving and loading converted checkpoints, and loading the base models they come from.

A converted checkpoint is an ordinary transformers directory (safetensors, sharded above
``max_shard_size``; tokenizer and generation config beside it) whose ``config.json`` carries:

* ``hc_retrofit``: the :class:`~hc_retrofit.HCConfig` settings;
* ``model_type: "hc_retrofit_<base type>"``: unknown to plain transformers, so loading it without
  ``trust_remote_code`` fails loudly instead of silently dropping the HC tensors;
* ``auto_map`` + copied modeling files (:mod:`hc_retrofit.remote_code`), so
  ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` works without hc-retrofit;
* ``hc_retrofit_base`` (the base model id or path), ``hc_retrofit_version``, the SHA-256 of the
  copied modeling files (``hc_retrofit_code_sha256``), and optional ``hc_retrofit_metadata``
  (e.g. a training summary).

:func:`load_converted` loads the same directory with the installed package instead of the copied code.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from hc_retrofit import outputs, ownership
from hc_retrofit.log import get_logger
from hc_retrofit.modeling.errors import AlreadyConvertedError, CheckpointError, ConfigError, NotConvertedError
from hc_retrofit.modeling.patch import CONFIG_KEY, is_converted
from hc_retrofit.modeling.remote_model import (
    BASE_ARCH_KEY,
    BASE_TYPE_KEY,
    HCRetrofitModelMixin,
    check_load_report,
    register_conversions,
    retrofit_model_type,
)
from hc_retrofit.remote_code import VERSION_KEY, shipped_code_warnings, write_remote_code

log = get_logger(__name__)

BASE_KEY = "hc_retrofit_base"
METADATA_KEY = "hc_retrofit_metadata"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
)
DTYPES: dict[str, Any] = {
    "auto": "auto",
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
"""The dtype names every command and recipe accepts (``auto``: the checkpoint's own)."""
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
"""Short spellings, accepted wherever a :data:`DTYPES` name is."""


# ----------------------------------------------------------------------------- small helpers
def parse_dtype(dtype: str | torch.dtype | None) -> str | torch.dtype:
    """A :data:`DTYPES` name (or alias) or a torch dtype -> a ``from_pretrained`` dtype."""
    if dtype is None:
        return "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    dtype = DTYPE_ALIASES.get(dtype, dtype)
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def read_config_dict(path: str | os.PathLike) -> dict[str, Any]:
    """The ``config.json`` of checkpoint directory ``path`` as a dict (clear error if there is none)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory")
    file = path / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{path} is not a model checkpoint: it has no config.json")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{file} is not valid JSON: {err}") from err


def is_converted_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a checkpoint directory written by :func:`save_converted`."""
    try:
        return isinstance(read_config_dict(path).get(CONFIG_KEY), dict)
    except CheckpointError:
        return False


def require_converted_dir(path: str | os.PathLike, fix: str = "run hc-retrofit convert first") -> None:
    """Refuse ``path`` unless it is a converted checkpoint: :class:`CheckpointError` if it is no checkpoint
    at all, else :class:`NotConvertedError` ending with ``fix``."""
    if not isinstance(read_config_dict(path).get(CONFIG_KEY), dict):
        raise NotConvertedError(f"{path} is not a converted hc-retrofit checkpoint; {fix}")


def _looks_like_path(name: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else is meant as a local path."""
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


# ----------------------------------------------------------------------------- saving
def check_output_dir(out_dir: Path, *, overwrite: bool, source: str | os.PathLike | None = None) -> Path:
    """Refuse an ``out_dir`` this tool may not write; see :func:`hc_retrofit.outputs.check_output_dir`."""
    return outputs.check_output_dir(out_dir, overwrite=overwrite, inputs=[source])


def write_converted_files(
    directory: Path, model: Any, tokenizer: Any = None, *, base: str | None, metadata: dict | None = None
) -> dict[str, Any]:
    """Beside the weights and ``config.json`` in ``directory``: the tokenizer, the remote code, and the
    converted config keys (model type, auto_map, base, version, metadata). Returns the keys written.

    Shared by :func:`save_converted` and the streaming convert, so both write the same directory.
    """
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    keys = write_remote_code(directory, model)
    import hc_retrofit

    keys.update({BASE_KEY: base, VERSION_KEY: hc_retrofit.__version__})
    if metadata:
        keys[METADATA_KEY] = metadata
    config_file = directory / "config.json"
    data = json.loads(config_file.read_text(encoding="utf-8"))
    data.update(keys)
    config_file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return keys


def save_converted(
    model: Any,
    out_dir: str | os.PathLike,
    tokenizer: Any = None,
    *,
    overwrite: bool = False,
    max_shard_size: str | int = "2GB",
    extra_metadata: dict | None = None,
    base_model: str | None = None,
) -> Path:
    """Save converted ``model`` (plus ``tokenizer``) to ``out_dir`` so that it loads anywhere.

    The directory is written next to ``out_dir`` under a temporary name and renamed at the end,
    so a failure or Ctrl-C never leaves a partial checkpoint. ``base_model`` (default: the id or
    path recorded earlier, else ``model.config._name_or_path``) is stored as ``hc_retrofit_base``;
    ``extra_metadata`` (JSON values) is merged into ``hc_retrofit_metadata``.

    Raises:
        NotConvertedError: ``model`` has no hyper-connections.
        OutputExistsError: ``out_dir`` exists and ``overwrite`` is false.
    """
    if not is_converted(model):
        raise NotConvertedError("the model has no hyper-connections; call hc_retrofit.convert(model) before saving")
    out = check_output_dir(Path(out_dir), overwrite=overwrite)
    with ownership.output_lock(out):
        keys = _save_staged(model, out, tokenizer, max_shard_size, base_model, extra_metadata)
    for key in (BASE_KEY, BASE_TYPE_KEY, BASE_ARCH_KEY):
        setattr(model.config, key, keys[key])
    return out


def _save_staged(
    model: Any, out: Path, tokenizer: Any, max_shard_size: str | int, base_model: str | None, extra: dict | None
) -> dict[str, Any]:
    """Write into a staging directory beside ``out``, seal its manifest, swap it in; return the config keys."""
    config = model.config
    base = base_model or getattr(config, BASE_KEY, None) or getattr(config, "_name_or_path", None) or None
    if base and Path(base).expanduser().is_dir():  # a local base: absolute, so verify works from any cwd
        base = str(Path(base).expanduser().resolve())
    metadata = {**(getattr(config, METADATA_KEY, None) or {}), **(extra or {})}
    tmp = outputs.staging_dir(out)
    try:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        keys = write_converted_files(tmp, model, tokenizer, base=base, metadata=metadata)
        outputs.replace_dir(tmp, out, kind="checkpoint")
    except BaseException as err:
        instead = outputs.abandon(tmp, err, out)
        if instead is not None:
            raise instead from err
        raise
    return keys


# ----------------------------------------------------------------------------- loading converted
@functools.cache
def _installed_classes(base_type: str, base_arch: str) -> tuple[type, type]:
    """The installed-package twins of the generated ``HCRetrofitConfig`` / ``HCRetrofit<Arch>``."""
    import transformers
    from transformers import CONFIG_MAPPING

    try:
        base_config = CONFIG_MAPPING[base_type]
        base_model = getattr(transformers, base_arch)
    except (KeyError, AttributeError) as err:
        raise CheckpointError(
            f"this transformers ({transformers.__version__}) has no {base_arch} of type {base_type!r}; upgrade transformers"
        ) from err
    model_type = retrofit_model_type(base_type)
    config_cls = type("HCRetrofitConfig", (base_config,), {"model_type": model_type, "__module__": __name__})
    model_cls = type(
        f"HCRetrofit{base_arch}",
        (HCRetrofitModelMixin, base_model),
        {"config_class": config_cls, "__module__": __name__},
    )
    register_conversions(model_type, base_type, base_arch)
    return config_cls, model_cls


def resolve_checkpoint(path_or_repo_id: str | os.PathLike, *, revision: str | None = None) -> Path:
    """A local directory for a checkpoint given as a directory or as a Hub id (downloaded, or from the cache)."""
    local = Path(path_or_repo_id).expanduser()
    name = str(path_or_repo_id)
    if local.exists() or _looks_like_path(name):
        return local
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, revision=revision))
    except Exception as err:  # offline, unknown repo, no access: every one is the user's to fix
        raise CheckpointError(
            f"cannot load {name!r}: it is not a local directory, and it could not be downloaded from the Hugging Face "
            f"Hub or found in its cache ({_one_line(err)})"
        ) from err


def _converted_classes(path: str | os.PathLike) -> tuple[type, type]:
    require_converted_dir(path)
    data = read_config_dict(path)
    base_type = data.get(BASE_TYPE_KEY) or str(data.get("model_type", "")).removeprefix("hc_retrofit_")
    base_arch = data.get(BASE_ARCH_KEY) or (data.get("architectures") or [""])[0].removeprefix("HCRetrofit")
    return _installed_classes(base_type, base_arch)


def _converted_config(path: str | os.PathLike) -> Any:
    return _converted_classes(path)[0].from_pretrained(path)


def load_converted(
    path: str | os.PathLike, *, dtype: str | torch.dtype | None = None, device: str | torch.device | None = None
) -> Any:
    """Load a converted checkpoint with the installed hc-retrofit (no ``trust_remote_code`` needed).

    ``dtype`` (default: the checkpoint's) applies to the base weights; HC parameters stay float32.
    Every tensor of the model must come from the checkpoint (else :class:`CheckpointError`). A
    warning is logged when the shipped modeling files (what ``trust_remote_code`` users run) were
    changed after they were written, or differ from what the installed hc-retrofit writes.
    """
    path = resolve_checkpoint(path)
    config = _converted_config(path)
    _, model_cls = _converted_classes(path)
    check_weight_files(path)
    try:
        model, info = model_cls.from_pretrained(path, config=config, dtype=parse_dtype(dtype), output_loading_info=True)
    except RuntimeError as err:  # transformers raises on tensor shapes that disagree with config.json
        if "mismatched" not in str(err) and "size mismatch" not in str(err):
            raise
        raise CheckpointError(
            f"{path}: tensor shapes disagree with config.json (was it edited, e.g. num_streams?); restore the config "
            "or convert again"
        ) from err
    check_load_report(info, path)
    for warning in shipped_code_warnings(path, model, read_config_dict(path)):
        log.warning(warning)
    if device is not None:
        model.to(device)
    return model.eval()


def check_weight_files(directory: str | os.PathLike) -> None:
    """Fail with one line on a truncated or garbage ``*.safetensors`` file, reading only its header.

    A damaged file would otherwise surface as a ``SafetensorError`` or a ``MemoryError`` (a garbage
    header length) from deep inside ``from_pretrained``.
    """
    for index in sorted(Path(directory).glob("*.index.json")):
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise CheckpointError(
                f"{index} is damaged (no weight_map); download or copy the checkpoint again"
            ) from None
        missing = sorted(str(name) for name in shards if not (Path(directory) / str(name)).is_file())
        if missing:
            raise CheckpointError(
                f"{directory}: shard {missing[0]}{f' and {len(missing) - 1} more' if len(missing) > 1 else ''} "
                f"listed in {index.name} is missing; download or copy the checkpoint again"
            )
    for file in sorted(Path(directory).glob("*.safetensors")):
        size = file.stat().st_size
        problem = None
        with file.open("rb") as f:
            head = f.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else -1
            if length < 2 or length > size - 8:
                problem = "is not a safetensors file or is truncated (bad header)"
            else:
                try:
                    header = json.loads(f.read(length))
                    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
                except (ValueError, KeyError, TypeError, IndexError, AttributeError):
                    problem = "has a damaged header"
                else:
                    if 8 + length + end > size:
                        problem = f"is truncated ({size:,} bytes, its header needs {8 + length + end:,})"
        if problem:
            raise CheckpointError(f"{file} {problem}; download or copy the checkpoint again")


_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?")


def is_valid_repo_id(name: str) -> bool:
    """Whether ``name`` is a Hub id: ``NAME`` or ``OWNER/NAME`` (letters, digits, ``-_.``, no ``..`` or ``--``)."""
    return bool(name) and _REPO_ID.fullmatch(name) is not None and ".." not in name and "--" not in name


def check_repo_id(name: str) -> None:
    """A Hub id must look like ``NAME`` or ``OWNER/NAME``, else one clear line."""
    if not is_valid_repo_id(name):
        raise CheckpointError(
            f"{name!r} is neither a local directory nor a valid Hub id (OWNER/NAME with letters, digits, '-', '_', "
            "'.'); check the spelling or the path"
        )


# ----------------------------------------------------------------------------- loading base models
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
    elif _looks_like_path(name):
        raise CheckpointError(f"{name}: no such directory")
    else:
        check_repo_id(name)
    try:
        config = AutoConfig.from_pretrained(
            str(local) if local.exists() else name, revision=revision, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as err:
        if local.exists():
            raise CheckpointError(f"cannot read the config of {name}: {_one_line(err)}") from err
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            raise CheckpointError(
                f"cannot load {name!r}: it is not a local directory, and it is not in the Hugging Face cache "
                "(HF_HUB_OFFLINE=1 is set); pass a local checkpoint directory, or download the model first"
            ) from err
        raise CheckpointError(
            f"cannot load {name!r}: it is not a local directory, and the Hugging Face Hub did not provide it "
            f"({_one_line(err)}); pass a local checkpoint directory, or set HF_HUB_OFFLINE=1 to use a model "
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
            extra["config"] = _converted_config(local)
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
        raise CheckpointError(f"cannot load the weights of {model_id_or_dir}: {_one_line(err)}") from err
    except RuntimeError as err:  # transformers raises on shapes that disagree with config.json
        raise CheckpointError(
            f"{model_id_or_dir}: its weights do not match its config.json ({_one_line(err)[:160]}); was the config "
            "edited? restore it"
        ) from err
    finally:
        transformers_logging.set_verbosity(verbosity)
    check_base_load_report(info, model_id_or_dir, config)
    from hc_retrofit.finite_weights import first_nonfinite_tensor, refuse_nonfinite

    refuse_nonfinite(model_id_or_dir, first_nonfinite_tensor(model))
    tokenizer = load_tokenizer(model_id_or_dir, revision=revision, trust_remote_code=trust_remote_code)
    return model.eval(), tokenizer
