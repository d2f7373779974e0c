"""`verify_checkpoint`: does a converted checkpoint still compute its base model's function?

Runs the converted model and its base on the same probe batch (both in float32) and reports the
largest absolute logit difference, the KL divergence of the next-token distributions and whether
greedy generation (which goes through the KV cache) produces the same tokens. A freshly converted
model must agree within tolerance; a trained one is expected to differ, and is only reported.
"""

from __future__ import annotations

import gc
import os
from dataclasses import asdict, dataclass
from typing import Any

import torch

from hc_retrofit.base_model import load_base_model, load_tokenizer
from hc_retrofit.checkpoint_format import BASE_KEY, read_config_dict, require_converted_dir
from hc_retrofit.code_check import code_problems
from hc_retrofit.dtypes import DTYPES
from hc_retrofit.in_place import NotInPlace, become_checkpoint
from hc_retrofit.loading import load_converted
from hc_retrofit.modeling.errors import CheckpointError, HCRetrofitError
from hc_retrofit.probe import probe_batch
from hc_retrofit.remote_code import remote_code_files
from hc_retrofit.runtime_classes import converted_classes
from hc_retrofit.tasks import is_causal_lm

LOGIT_ATOL = 1e-4
LOGIT_RTOL = 1e-4
KL_TOL = 1e-6


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

    @property
    def remote_code_ok(self) -> bool:
        """The shipped modeling files (what ``trust_remote_code`` users run) are the ones verified here."""
        return not self.remote_code_problems

    @property
    def equivalent(self) -> bool:
        """Same function within tolerance: logits, distributions and greedy tokens."""
        return self.max_abs_logit_diff <= self.logit_tolerance and self.max_kl <= KL_TOL and self.greedy_identical

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


def _kl(base_logits: torch.Tensor, other_logits: torch.Tensor) -> torch.Tensor:
    """KL(base || other) per position, in float64."""
    p = torch.log_softmax(base_logits.double(), dim=-1)
    q = torch.log_softmax(other_logits.double(), dim=-1)
    return (p.exp() * (p - q)).sum(-1).clamp_min(0.0)


@torch.no_grad()
def greedy_continuation(model: Any, prompt: torch.Tensor, new_tokens: int, pad_id: int) -> torch.Tensor:
    """The ``new_tokens`` greedy tokens after ``prompt`` (through the KV cache, as generation in use runs)."""
    out = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=pad_id,
    )
    return out[:, prompt.shape[1] :]


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


def _pad_id(model: Any) -> int:
    pad = model.generation_config.pad_token_id
    pad = pad if isinstance(pad, int) else (model.config.eos_token_id or 0)
    return pad[0] if isinstance(pad, list) else pad


def _run(model: Any, ids: torch.Tensor, new_tokens: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of the probe batch and the greedy continuation of its first half."""
    logits = model(ids).logits.float()
    prompt = ids[:, : max(2, ids.shape[1] // 2)]
    return logits, greedy_continuation(model, prompt, new_tokens, pad)


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
    recorded = base is None
    base = base or base_model_of(converted_dir)
    base_dtype = base_dtype or stored_dtype(converted_dir)
    how = choose_mode(converted_dir, mode)

    def base_failed(err: HCRetrofitError) -> HCRetrofitError | None:
        """The error to raise when the base cannot be loaded: a recorded base is named as such."""
        from hc_retrofit.finite_weights import NonFiniteWeightsError

        if not recorded or isinstance(err, NonFiniteWeightsError):
            return None
        return type(err)(f"the base model recorded in {converted_dir} cannot be loaded ({err}); pass it with --base")

    def require_causal(converted: Any) -> None:
        if not is_causal_lm(converted):
            cls = converted if isinstance(converted, type) else type(converted)
            raise CheckpointError(
                f"{converted_dir} holds a {cls.__name__.removeprefix('HCRetrofit')}, not a causal LM: "
                "verify compares causal LMs (an encoder or vision model was proven exact when hc_retrofit.convert "
                "returned it)"
            )

    if how == MEMORY:
        require_causal(converted_classes(converted_dir)[1])
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
        vocab = min(int(read_config_dict(converted_dir).get("vocab_size") or 0) or 10**9, base_model.config.vocab_size)
        ids = probe_batch(tokenizer, vocab)
        pad = _pad_id(base_model)
        ref, gen_ref = _run(base_model, ids, new_tokens, pad)
        # One model in memory: the base becomes the written checkpoint's model in place (every tensor from
        # its files); when it cannot, the checkpoint is loaded whole once the base is gone.
        try:
            converted = become_checkpoint(base_model, converted_dir).eval()
        except NotInPlace:
            converted = None
        del base_model
        if converted is None:
            gc.collect()
            converted = load_converted(converted_dir, dtype=torch.float32)
        got, gen_got = _run(converted, ids, new_tokens, pad)
    else:
        from hc_retrofit.layered_verify import layered_outputs

        converted, ids, (ref, gen_ref), (got, gen_got) = layered_outputs(
            converted_dir,
            base,
            revision=revision,
            base_dtype=base_dtype,
            new_tokens=new_tokens,
            run=_run,
            pad_of=_pad_id,
            base_failed=base_failed,
            check_converted=require_causal,
        )
    if ref.shape != got.shape:
        raise CheckpointError(
            f"{base} is not the base of {converted_dir}: logits {tuple(ref.shape)} vs {tuple(got.shape)}"
        )
    kl = _kl(ref, got)
    settings = converted.hc_config
    return VerifyReport(
        converted_dir=str(converted_dir),
        base_model=base,
        variant=settings.variant,
        num_streams=settings.num_streams,
        probe_shape=(int(ids.shape[0]), int(ids.shape[1])),
        max_abs_logit_diff=float((got - ref).abs().max()),
        logit_tolerance=LOGIT_ATOL + LOGIT_RTOL * float(ref.abs().max()),
        mean_kl=float(kl.mean()),
        max_kl=float(kl.max()),
        greedy_agreement=float((gen_ref == gen_got).float().mean()),
        greedy_identical=bool(torch.equal(gen_ref, gen_got)),
        trained=trained,
        remote_code_problems=tuple(code_problems(converted_dir, remote_code_files(converted))),
        base_dtype=str(base_dtype).removeprefix("torch."),
        loading=how,
    )
