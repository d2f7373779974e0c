"""`verify_checkpoint`: does a converted checkpoint still compute its base model's function?

Runs the converted model and its base on the same probe batch (both in float32) and reports the
largest absolute logit difference, the KL divergence of the next-token distributions and whether
greedy generation (which goes through the KV cache) produces the same tokens: the probe, the runs,
the comparison and the float32 tolerance are :mod:`hc_retrofit.equivalence`'s, as for the proof at
every conversion. A freshly converted model must agree within tolerance; a trained one is expected
to differ, and is only reported.
"""

from __future__ import annotations

import gc
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from hc_retrofit.base_model import load_base_model, load_tokenizer
from hc_retrofit.checkpoint_format import BASE_KEY, read_config_dict, require_converted_dir
from hc_retrofit.code_check import code_problems
from hc_retrofit.dtypes import DTYPES
from hc_retrofit.equivalence import (
    CHECKPOINT_BATCH,
    CHECKPOINT_LENGTH,
    Comparison,
    ProbeOutputs,
    measure,
    probe_inputs,
    run_probe,
)
from hc_retrofit.in_place import NotInPlace, become_checkpoint
from hc_retrofit.loading import load_converted
from hc_retrofit.modeling.errors import CheckpointError, HCRetrofitError
from hc_retrofit.remote_code import remote_code_files
from hc_retrofit.runtime_classes import converted_classes
from hc_retrofit.tasks import is_causal_lm


@dataclass(frozen=True)
class VerifyReport:
    """The comparison of a converted checkpoint with its base model on a probe batch."""

    converted_dir: str
    base_model: str
    variant: str
    num_streams: int
    probe_shape: tuple[int, int]
    max_abs_logit_diff: float
    logit_tolerance: float
    mean_kl: float
    max_kl: float
    greedy_agreement: float
    greedy_identical: bool
    trained: bool
    remote_code_problems: tuple[str, ...] = ()
    base_dtype: str = "float32"
    loading: str = "in memory"  # or "layer by layer" (one decoder layer in memory at a time)
    kl_tolerance: float = 0.0
    difference: str | None = None  # what differs from the base (None: equivalent)

    @property
    def remote_code_ok(self) -> bool:
        """The shipped modeling files (what ``trust_remote_code`` users run) are the ones verified here."""
        return not self.remote_code_problems

    @property
    def equivalent(self) -> bool:
        """Same function within tolerance: logits, distributions, greedy tokens and their cached steps."""
        return self.difference is None

    @property
    def ok(self) -> bool:
        """What the exit code reports: equivalent (or a trained model, expected to differ) with intact shipped code."""
        return (self.equivalent or self.trained) and self.remote_code_ok

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "probe_shape": list(self.probe_shape),
            "remote_code_problems": list(self.remote_code_problems),
            "remote_code_ok": self.remote_code_ok,
            "equivalent": self.equivalent,
            "ok": self.ok,
        }


def base_model_of(converted_dir: str | os.PathLike) -> str:
    """The base model id or path recorded in a converted checkpoint."""
    base = read_config_dict(converted_dir).get(BASE_KEY)
    if not base:
        raise CheckpointError(f"{converted_dir} does not record its base model; pass it with --base")
    return str(base)


def stored_dtype(converted_dir: str | os.PathLike) -> torch.dtype:
    """The dtype the checkpoint's weights were saved in (``config.json``'s ``dtype``; float32 if unrecorded).

    A conversion with ``--dtype bfloat16`` rounds the base weights once; comparing it with the base at
    float32 would measure that rounding, not the conversion. So the base is loaded at this dtype (and
    both models then compute in float32): the same rounding on both sides, an exact conversion agrees.
    """
    config = read_config_dict(converted_dir)
    name = str(config.get("dtype") or config.get("torch_dtype") or "float32").removeprefix("torch.")
    dtype = DTYPES.get(name)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


MODES = ("auto", "memory", "layers")
MEMORY, LAYERS = "in memory", "layer by layer"


def in_memory_bytes(converted_dir: str | os.PathLike) -> int:
    """What the in-memory verify holds: one model in float32 (the base, turned into the converted model in
    place; from the headers)."""
    from hc_retrofit.layered import stored_tensors

    elements = sum(int(torch.Size(t.shape).numel()) for t in stored_tensors(converted_dir).values())
    return 4 * elements


def choose_mode(converted_dir: str | os.PathLike, mode: str = "auto") -> str:
    """:data:`MEMORY` or :data:`LAYERS`: ``mode`` (``auto``: in memory when the float32 model fits
    in 80% of the available memory, else layer by layer)."""
    from hc_retrofit.layered import LayeredUnavailable, available_memory

    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode != "auto":
        return MEMORY if mode == "memory" else LAYERS
    available = available_memory()
    try:
        need = in_memory_bytes(converted_dir)
    except LayeredUnavailable:  # not safetensors: only the in-memory load reads it
        return MEMORY
    return LAYERS if available is not None and need > 0.8 * available else MEMORY


def _base_failed(
    converted_dir: str | os.PathLike, recorded: bool
) -> Callable[[HCRetrofitError], HCRetrofitError | None]:
    """The error to raise when the base cannot be loaded: a recorded base is named as such (``None``: the error)."""

    def named(err: HCRetrofitError) -> HCRetrofitError | None:
        from hc_retrofit.finite_weights import NonFiniteWeightsError

        if not recorded or isinstance(err, NonFiniteWeightsError):
            return None
        return type(err)(f"the base model recorded in {converted_dir} cannot be loaded ({err}); pass it with --base")

    return named


def _causal_only(converted_dir: str | os.PathLike) -> Callable[[Any], None]:
    """A check refusing a converted model (or class) that is not a causal LM, in one line."""

    def check(converted: Any) -> None:
        if not is_causal_lm(converted):
            cls = converted if isinstance(converted, type) else type(converted)
            raise CheckpointError(
                f"{converted_dir} holds a {cls.__name__.removeprefix('HCRetrofit')}, not a causal LM: "
                "verify compares causal LMs (an encoder or vision model was proven exact when hc_retrofit.convert "
                "returned it)"
            )

    return check


def _outputs_in_memory(
    converted_dir: str | os.PathLike,
    base: str,
    *,
    revision: str | None,
    base_dtype: torch.dtype,
    new_tokens: int,
    base_failed: Callable[[HCRetrofitError], HCRetrofitError | None],
    check_converted: Callable[[Any], None],
) -> tuple[Any, dict[str, torch.Tensor], ProbeOutputs, ProbeOutputs]:
    """``(converted model, probe inputs, base outputs, converted outputs)`` with one model in memory: the
    base runs the probe, then becomes the written checkpoint's model in place (every tensor from its
    files) and runs it again; when it cannot, the checkpoint is loaded whole once the base is gone.
    ``base_failed`` and ``check_converted`` (run on the checkpoint's class first): as for
    :func:`~hc_retrofit.layered_verify.layered_outputs`."""
    check_converted(converted_classes(converted_dir)[1])
    try:
        base_model, tokenizer = load_base_model(base, revision=revision, dtype=base_dtype)
    except HCRetrofitError as err:
        named = base_failed(err)
        if named is None:
            raise
        raise named from err
    base_model.float()
    if tokenizer is None:
        tokenizer = load_tokenizer(str(converted_dir))
    vocab = int(read_config_dict(converted_dir).get("vocab_size") or 0) or None
    inputs = probe_inputs(
        base_model, tokenizer=tokenizer, vocab=vocab, batch=CHECKPOINT_BATCH, length=CHECKPOINT_LENGTH
    )
    reference = run_probe(base_model, inputs, new_tokens=new_tokens)
    try:
        converted = become_checkpoint(base_model, converted_dir).eval()
    except NotInPlace:
        converted = None
    del base_model
    if converted is None:
        gc.collect()
        converted = load_converted(converted_dir, dtype=torch.float32)
    return converted, inputs, reference, run_probe(converted, inputs, new_tokens=new_tokens)


@torch.no_grad()
def verify_checkpoint(
    converted_dir: str | os.PathLike,
    base: str | None = None,
    *,
    trained: bool = False,
    new_tokens: int = 12,
    revision: str | None = None,
    base_dtype: torch.dtype | None = None,
    mode: str = "auto",
) -> VerifyReport:
    """Compare ``converted_dir`` with ``base`` (default: the base model recorded in it).

    ``base_dtype``: load the base in this dtype (then compute in float32, like the converted model),
    to check a conversion that changed the dtype against the base at the same precision. Default: the
    dtype the converted checkpoint was saved in (:func:`stored_dtype`).
    ``mode``: ``memory`` loads the base whole, runs it, and turns it into the checkpoint's model in
    place (:mod:`hc_retrofit.in_place`: every tensor from the written files; one model in memory);
    ``layers`` runs both with one decoder layer in memory at a time (:mod:`hc_retrofit.layered`: the
    same numbers, for models larger than the memory); ``auto`` picks ``layers`` when one would not fit.
    """
    require_converted_dir(converted_dir)
    base_failed = _base_failed(converted_dir, recorded=base is None)
    base = base or base_model_of(converted_dir)
    base_dtype = base_dtype or stored_dtype(converted_dir)
    how = choose_mode(converted_dir, mode)
    if how == MEMORY:
        outputs = _outputs_in_memory
    else:
        from hc_retrofit.layered_verify import layered_outputs as outputs
    converted, inputs, ref, got = outputs(
        converted_dir,
        base,
        revision=revision,
        base_dtype=base_dtype,
        new_tokens=new_tokens,
        base_failed=base_failed,
        check_converted=_causal_only(converted_dir),
    )
    if ref.logits.shape != got.logits.shape:
        raise CheckpointError(
            f"{base} is not the base of {converted_dir}: logits {tuple(ref.logits.shape)} vs {tuple(got.logits.shape)}"
        )
    return _report(converted_dir, base, converted, measure(ref, got, torch.float32), inputs, trained, base_dtype, how)


def _report(
    converted_dir: str | os.PathLike,
    base: str,
    converted: Any,
    comparison: Comparison,
    inputs: dict[str, torch.Tensor],
    trained: bool,
    base_dtype: torch.dtype,
    loading: str,
) -> VerifyReport:
    settings = converted.hc_config
    ids = inputs["input_ids"]
    return VerifyReport(
        converted_dir=str(converted_dir),
        base_model=base,
        variant=settings.variant,
        num_streams=settings.num_streams,
        probe_shape=(int(ids.shape[0]), int(ids.shape[1])),
        max_abs_logit_diff=comparison.max_abs_logit_diff,
        logit_tolerance=comparison.logit_tolerance,
        mean_kl=float(comparison.mean_kl if comparison.mean_kl is not None else math.nan),
        max_kl=float(comparison.max_kl if comparison.max_kl is not None else math.nan),
        greedy_agreement=comparison.greedy_agreement,
        greedy_identical=comparison.greedy_identical,
        trained=trained,
        remote_code_problems=tuple(code_problems(converted_dir, remote_code_files(converted))),
        base_dtype=str(base_dtype).removeprefix("torch."),
        loading=loading,
        kl_tolerance=comparison.kl_tolerance,
        difference=comparison.problem,
    )
