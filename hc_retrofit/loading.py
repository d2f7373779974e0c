"""Loading a converted checkpoint with the installed hc-retrofit (no ``trust_remote_code``)."""

from __future__ import annotations

import os
from typing import Any

import torch

from hc_retrofit.checkpoint_format import check_weight_files, read_config_dict
from hc_retrofit.checkpoint_source import resolve_checkpoint
from hc_retrofit.dtypes import parse_dtype
from hc_retrofit.log import get_logger
from hc_retrofit.modeling.remote_model import check_load_report
from hc_retrofit.remote_code import shipped_code_warnings
from hc_retrofit.runtime_classes import converted_classes

log = get_logger(__name__)


def load_converted(
    path: str | os.PathLike, *, dtype: str | torch.dtype | None = None, device: str | torch.device | None = None
) -> Any:
    """Load a converted checkpoint (a directory or a Hub id) with the installed hc-retrofit.

    ``dtype`` (default: the checkpoint's) applies to the base weights; HC parameters stay float32.
    Every tensor of the model must come from the checkpoint (else :class:`CheckpointError`). A
    warning is logged when the shipped modeling files (what ``trust_remote_code`` users run) were
    changed after they were written, or differ from what the installed hc-retrofit writes.
    """
    path = resolve_checkpoint(path)
    config_cls, model_cls = converted_classes(path)
    config = config_cls.from_pretrained(path)
    check_weight_files(path)
    # tensor shapes that disagree with config.json are reported in ``info`` (a CheckpointError), not raised
    model, info = model_cls.from_pretrained(
        path, config=config, dtype=parse_dtype(dtype), output_loading_info=True, ignore_mismatched_sizes=True
    )
    check_load_report(info, path)
    for warning in shipped_code_warnings(path, model, read_config_dict(path)):
        log.warning(warning)
    if device is not None:
        model.to(device)
    return model.eval()


def build_float32(model_cls: type, config: Any) -> Any:
    """``model_cls(config)`` with float32 weights, as ``from_config(config, dtype=torch.float32)`` builds it.

    The public constructor builds in torch's default dtype (float32 unless a caller changed the
    default, in which case the model is cast); ``config.dtype`` is set to match, as ``from_config``
    sets it. Under ``torch.device("meta")`` this costs nothing.
    """
    config.dtype = torch.float32
    model = model_cls(config)
    return model if torch.get_default_dtype() == torch.float32 else model.float()
