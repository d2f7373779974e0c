"""`convert_checkpoint`: base checkpoint in, converted checkpoint directory out (what `hc-retrofit convert` runs).

Everything that can be checked before loading weights is checked first (settings, dtype, output
directory, architecture), so bad input fails fast and writes nothing. The model is loaded once
(transformers 5 loads lazily, shard by shard), converted in place (no copy) and saved atomically.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hc_retrofit.base_model import load_base_config, load_base_model
from hc_retrofit.dtypes import parse_dtype
from hc_retrofit.modeling.config import HCConfig
from hc_retrofit.modeling.families import family_for
from hc_retrofit.modeling.patch import decoder_layers, hyper_connection_sites
from hc_retrofit.ownership import output_lock
from hc_retrofit.proof import convert
from hc_retrofit.saving import check_output_dir, save_converted


@dataclass(frozen=True)
class ConvertSummary:
    """What a conversion did (printed by the CLI, returned to Python callers)."""

    base_model: str
    out_dir: str
    model_type: str
    block_kind: str
    layers: int
    sites: int
    num_streams: int
    variant: str
    base_parameters: int
    added_parameters: int
    has_tokenizer: bool
    seconds: float

    @property
    def added_percent(self) -> float:
        return 100.0 * self.added_parameters / max(1, self.base_parameters)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "added_percent": self.added_percent}


def count_parameters(model: Any) -> int:
    """Distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def convert_checkpoint(
    model_id_or_dir: str,
    out_dir: str | os.PathLike,
    config: HCConfig,
    *,
    revision: str | None = None,
    dtype: str = "auto",
    overwrite: bool = False,
    trust_remote_code: bool = False,
    progress: Callable[[str], None] | None = None,
) -> ConvertSummary:
    """Load ``model_id_or_dir``, retrofit it with ``config`` and save it to ``out_dir``.

    Raises the :class:`~hc_retrofit.modeling.errors.HCRetrofitError` subclasses of the steps (unknown model,
    not a checkpoint, unsupported or already converted architecture, existing output, ...) before
    anything is written.
    """
    out = check_output_dir(Path(out_dir), overwrite=overwrite, source=model_id_or_dir)
    with output_lock(out):  # a second writer of out_dir is refused now, not after loading
        return _convert_locked(
            model_id_or_dir,
            out,
            config,
            revision=revision,
            dtype=dtype,
            overwrite=overwrite,
            trust_remote_code=trust_remote_code,
            progress=progress,
        )


def _convert_locked(
    model_id_or_dir: str,
    out: Path,
    config: HCConfig,
    *,
    revision: str | None,
    dtype: str,
    overwrite: bool,
    trust_remote_code: bool,
    progress: Callable[[str], None] | None,
) -> ConvertSummary:
    """:func:`convert_checkpoint` while holding the lock of ``out``."""
    say = progress or (lambda _msg: None)
    start = time.perf_counter()
    torch_dtype = parse_dtype(dtype)
    say(f"reading the config of {model_id_or_dir}")
    base_config = load_base_config(model_id_or_dir, revision=revision, trust_remote_code=trust_remote_code)
    say(f"loading {model_id_or_dir} ({base_config.model_type})")
    model, tokenizer = load_base_model(
        model_id_or_dir, revision=revision, dtype=torch_dtype, trust_remote_code=trust_remote_code
    )
    base_params = count_parameters(model)
    say(f"adding {config.variant} hyper-connections ({config.num_streams} streams) and checking them")
    convert(model, config)  # proven exact on a probe batch, or refused with the model unchanged
    family = family_for(model.config)  # the structure that was proven (recorded in the config)
    block = family.block_for(model.config)
    added = count_parameters(model) - base_params
    say(f"saving to {out}")
    local = Path(model_id_or_dir).expanduser()
    base_name = str(local.resolve()) if local.is_dir() else str(model_id_or_dir)  # verify runs from any cwd
    save_converted(model, out, tokenizer, overwrite=overwrite, base_model=base_name)
    return ConvertSummary(
        base_model=base_name,
        out_dir=str(out),
        model_type=base_config.model_type,
        block_kind=block.kind,
        layers=len(decoder_layers(model, family)),
        sites=len(hyper_connection_sites(model)),
        num_streams=config.num_streams,
        variant=config.variant,
        base_parameters=base_params,
        added_parameters=added,
        has_tokenizer=tokenizer is not None,
        seconds=time.perf_counter() - start,
    )
