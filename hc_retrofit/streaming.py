"""Streaming convert: a converted checkpoint written without loading the base model's weights.

A conversion changes no base tensor (names and values stay), and the HC tensors depend only on
the config. So the converted directory is the base safetensors shards, unchanged (copied, or hard
linked with ``link=True``; re-encoded tensor by tensor only when the dtype changes), plus one
shard of HC tensors, an index, the converted config, tokenizer, generation config and remote code.
Memory stays at one tensor (re-encoding) or nothing (copying), whatever the model size.

Three jobs, three modules: :mod:`hc_retrofit.stream_plan` proves from configs and headers that the
output is the in-memory conversion's, or says why it cannot (:class:`CannotStream`: the caller then
converts in memory); :mod:`hc_retrofit.stream_write` writes the plan into a staging directory;
this module runs both, and verifies the written files against the base before they replace the
output (:func:`verify_streamed`, the comparison of :mod:`hc_retrofit.equivalence`).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hc_retrofit import outputs
from hc_retrofit.checkpoint_format import HC_SHARD, INDEX_FILE
from hc_retrofit.conversion import ConvertSummary, count_parameters
from hc_retrofit.dtypes import parse_dtype
from hc_retrofit.equivalence import NEW_TOKENS, NotEquivalentError
from hc_retrofit.modeling.config import HCConfig
from hc_retrofit.modeling.families import family_for
from hc_retrofit.modeling.patch import decoder_layers, hyper_connection_sites
from hc_retrofit.saving import check_output_dir
from hc_retrofit.shard_copy import EarlyCopy, start_copy
from hc_retrofit.stream_plan import CannotStream, Shard, StreamPlan, hc_tensors, plan_streaming
from hc_retrofit.stream_write import say_copying, write_plan, write_safetensors

__all__ = [
    "HC_SHARD",
    "INDEX_FILE",
    "CannotStream",
    "NotEquivalentError",
    "Shard",
    "StreamPlan",
    "StreamSummary",
    "hc_tensors",
    "plan_streaming",
    "stream_convert",
    "verify_streamed",
    "write_plan",
    "write_safetensors",
]


@dataclass(frozen=True)
class StreamSummary(ConvertSummary):
    """:class:`ConvertSummary` of a streamed conversion, with how the shards were written and checked."""

    shards: int = 0
    linked_shards: int = 0
    reencoded_shards: int = 0
    verified: bool = False
    verify_loading: str | None = None  # how verify ran: "in memory" or "layer by layer" (larger than memory)
    timings: dict[str, float] = field(
        default_factory=dict
    )  # seconds: plan, files (HC shard, config, tokenizer, code), copy, copy wait, checks, verify


def stream_convert(
    model_id_or_dir: str,
    out_dir: str | os.PathLike,
    config: HCConfig,
    *,
    revision: str | None = None,
    dtype: str = "auto",
    overwrite: bool = False,
    trust_remote_code: bool = False,
    link: bool = False,
    verify: bool = False,
    check: Callable[[Path], None] | None = None,
    progress: Callable[[str], None] | None = None,
    early: EarlyCopy | None = None,
) -> StreamSummary:
    """Convert ``model_id_or_dir`` to ``out_dir`` without loading its weights (see the module docstring).

    ``verify``: run :func:`verify_streamed` on the result before moving it into place: one
    model in float32 in memory when it fits, else layer by layer (:mod:`hc_retrofit.layered`;
    said through ``progress`` and in the summary). ``check(dir)``: any other check at that point.
    The shards of a local checkpoint are copied in the background from the start (with ``dtype``
    ``auto``; ``early``: a copy the caller started, see :func:`start_copy`), while it plans.
    Raises :class:`CannotStream` when only :func:`convert_checkpoint` can do it (nothing left behind).
    The lock of ``out_dir`` is held throughout (a second writer is refused).
    """
    target = check_output_dir(Path(out_dir), overwrite=overwrite, source=model_id_or_dir)
    with outputs.output_lock(target):
        return _stream_convert(
            model_id_or_dir,
            out_dir,
            config,
            revision=revision,
            dtype=dtype,
            overwrite=overwrite,
            trust_remote_code=trust_remote_code,
            link=link,
            verify=verify,
            check=check,
            progress=progress,
            early=early,
        )


def _stream_convert(
    model_id_or_dir: str,
    out_dir: str | os.PathLike,
    config: HCConfig,
    *,
    revision: str | None,
    dtype: str,
    overwrite: bool,
    trust_remote_code: bool,
    link: bool,
    verify: bool,
    check: Callable[[Path], None] | None,
    progress: Callable[[str], None] | None,
    early: EarlyCopy | None,
) -> StreamSummary:
    """:func:`stream_convert` while holding the output's lock."""
    say = progress or (lambda _msg: None)
    start = time.perf_counter()
    parse_dtype(dtype)
    if early is None and dtype == "auto":  # a dtype change re-encodes, most likely every shard: no early copy
        early = start_copy(model_id_or_dir, out_dir, overwrite=overwrite, link=link)
    if early is None:
        check_output_dir(Path(out_dir), overwrite=overwrite, source=model_id_or_dir)
    else:
        say_copying(early.copier, say)
    timings: dict[str, float] = {}
    try:
        say(f"reading the config and tensor headers of {model_id_or_dir}")
        plan = plan_streaming(
            model_id_or_dir, config, revision=revision, dtype=dtype, trust_remote_code=trust_remote_code, progress=say
        )
        timings["plan"] = time.perf_counter() - start
    except BaseException:
        if early is not None:
            early.abort()
        raise
    loading: list[str] = []

    def run_checks(directory: Path) -> None:
        if check is not None:
            check(directory)
        if verify:
            started = time.perf_counter()
            loading.append(verify_streamed(directory, plan.dtype, progress=say))
            timings["verify"] = time.perf_counter() - started

    out, linked = write_plan(
        plan,
        out_dir,
        overwrite=overwrite,
        link=link,
        check=run_checks,
        progress=say,
        early=early,
        timings=timings,
    )
    model = plan.model
    family = family_for(plan.base_config)
    added = sum(t.numel() for t in plan.hc_tensors.values())
    local = Path(model_id_or_dir).expanduser()
    return StreamSummary(
        base_model=str(local.resolve()) if local.is_dir() else str(model_id_or_dir),
        out_dir=str(out),
        model_type=plan.base_config.model_type,
        block_kind=family.block_for(plan.base_config).kind,
        layers=len(decoder_layers(model, family)),
        sites=len(hyper_connection_sites(model)),
        num_streams=config.num_streams,
        variant=config.variant,
        base_parameters=count_parameters(model) - added,
        added_parameters=added,
        has_tokenizer=(out / "tokenizer_config.json").is_file() or (out / "tokenizer.json").is_file(),
        seconds=time.perf_counter() - start,
        shards=len(plan.shards),
        linked_shards=linked,
        reencoded_shards=sum(1 for shard in plan.shards if shard.cast),
        verified=bool(loading),
        verify_loading=loading[0] if loading else None,
        timings=timings,
    )


def verify_streamed(directory: Path, dtype: torch.dtype, progress: Callable[[str], None] | None = None) -> str:
    """Run ``verify`` on a streamed checkpoint (before it is moved into place); refuse it unless exact.

    The base is loaded in the checkpoint's ``dtype``: a conversion to bfloat16 must compute what
    the base computes in bfloat16. One model in memory when it fits, else layer by layer.
    Returns how they were loaded (``"in memory"`` or ``"layer by layer"``).
    """
    from hc_retrofit.verify import LAYERS, choose_mode, verify_checkpoint

    how = choose_mode(directory)
    if progress is not None:
        detail = " (larger than the memory: layer by layer)" if how == LAYERS else ""
        progress(f"verifying: running the base and the converted model on a probe batch{detail}")
    # the probe of the in-memory convert's proof: the full-sequence logits, then the prefill and one
    # step through the KV cache (``hc-retrofit verify`` continues for longer, to show the agreement)
    report = verify_checkpoint(
        directory, base_dtype=dtype, mode="layers" if how == LAYERS else "memory", new_tokens=NEW_TOKENS
    )
    if not report.equivalent:
        from hc_retrofit.finite_weights import first_nonfinite_in_files, refuse_nonfinite

        if not math.isfinite(report.max_abs_logit_diff):  # NaN logits: a damaged base, not a bug of ours
            refuse_nonfinite(report.base_model, first_nonfinite_in_files(directory))
        raise NotEquivalentError(
            f"the streamed checkpoint is not equivalent to {report.base_model} (max |logit diff| "
            f"{report.max_abs_logit_diff:.2e}, max KL {report.max_kl:.2e}); nothing was written. Convert with "
            "--in-memory, and please report this bug"
        )
    return report.loading
