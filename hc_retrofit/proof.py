"""`convert`: retrofit a loaded model and prove the result exact before returning it.

A wrong model is the one unforgivable bug, so no adapter is trusted (hand-written or discovered):
the original model is run on a small probe batch first (full-sequence logits, plus a two-token
greedy ``generate()`` through the KV cache where the model can generate), then each candidate
adapter is applied with :func:`hc_retrofit.modeling.patch.apply_family` and the probe is run again
(:mod:`hc_retrofit.equivalence`: the probe, the run, the comparison and the tolerance of the model's
dtype). The first candidate that is equivalent (tokens identical) is kept and its structure is
recorded in ``config.hc_retrofit_structure`` (so saved checkpoints rebuild exactly that structure).
A candidate that is not exact, or fails, is undone -- every module gets back its class, attributes,
submodules, parameters, buffers and hooks -- and the next one is tried. When none is exact the
model is left exactly as it was and :class:`UnsupportedArchitectureError` names the family and
every structure tried.

No copy of the model is made: the reference outputs are kept, not the reference model.
"""

from __future__ import annotations

import torch
from torch import nn

from hc_retrofit.discovery import discover
from hc_retrofit.equivalence import ProbeOutputs, compare, model_dtype, probe_inputs, run_probe
from hc_retrofit.log import one_line
from hc_retrofit.modeling.config import HCConfig
from hc_retrofit.modeling.errors import HCRetrofitError, UnsupportedArchitectureError
from hc_retrofit.modeling.families import FAMILIES, Family
from hc_retrofit.modeling.patch import apply_family, check_convertible, remove_hyper_connections


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

    ``model`` is a loaded transformers model (a causal LM, an encoder or a vision model).
    ``family`` (default: the hand-written adapter of ``config.model_type``, else discovery's
    proposals) says where the hyper-connection sites go. Before returning, the converted model is
    compared with the original on a probe batch (:mod:`hc_retrofit.equivalence`: outputs and
    distributions within the tolerance of the model's dtype, and the same greedy tokens and logits
    through the KV cache where the model can generate).

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
    dtype = model_dtype(model)
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
        return f"failed: {one_line(err)}"
    except BaseException:  # Ctrl-C: leave the model as it was
        remove_hyper_connections(model)
        raise
    if problem is not None:
        remove_hyper_connections(model)
    return problem
