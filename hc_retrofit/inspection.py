"""`inspect_model` / `inspect_checkpoint`: what the hyper-connections of a model have learned.

Per site: the width weights ``a``, the stream-mixing matrix ``R`` and the depth weights ``b``
(their input-independent part; dynamic variants add a per-token term, summarised by its scale and
projection norm), ``R``'s distance from the identity and from the doubly stochastic matrices
(mHC keeps it doubly stochastic up to Sinkhorn convergence). Per layer: the *stream divergence*
on a probe batch, ``||H - mean_j H_j|| / (sqrt(n) ||mean_j H_j||)``, which is 0 at initialisation
(every stream carries the same hidden state) and grows as training makes the streams differ.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import Any

import torch

from hc_retrofit.base_model import load_tokenizer
from hc_retrofit.checkpoint_format import require_converted_dir
from hc_retrofit.equivalence import CHECKPOINT_BATCH, CHECKPOINT_LENGTH, probe_ids
from hc_retrofit.loading import load_converted
from hc_retrofit.modeling.converted_layer import HCDecoderLayerMixin
from hc_retrofit.modeling.errors import NotConvertedError
from hc_retrofit.modeling.patch import is_converted
from hc_retrofit.modeling.site import HyperConnection


@dataclass(frozen=True)
class SiteReport:
    """The coefficients of one hyper-connection site."""

    layer: int
    site: int
    width: list[float]
    residual: list[list[float]]
    depth: list[float]
    residual_identity_distance: float
    residual_doubly_stochastic_distance: float
    dynamic_scale: list[float] | None
    dynamic_proj_norm: float | None


@dataclass(frozen=True)
class InspectionReport:
    """Every site of a converted model plus the stream divergence per layer."""

    variant: str
    num_streams: int
    sites: list[SiteReport]
    stream_divergence: list[float]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def static_coefficients(site: HyperConnection) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``a, R, b`` without the input-dependent term of the dynamic variants (float32, detached):
    the site's own formula (:meth:`HyperConnection.static_coefficients`)."""
    with torch.no_grad():
        c = site.static_coefficients()
        return c.a.detach().float().clone(), c.r.detach().float().clone(), c.b.detach().float().clone()


def site_report(layer: int, site: HyperConnection) -> SiteReport:
    a, r, b = (t.detach().cpu().float() for t in static_coefficients(site))
    n = r.shape[-1]
    stochastic = max(
        float((r.sum(-1) - 1).abs().max()), float((r.sum(-2) - 1).abs().max()), float((-r).clamp_min(0).max())
    )
    dynamic = site.is_dynamic
    return SiteReport(
        layer=layer,
        site=site.site_index,
        width=[round(float(v), 6) for v in a],
        residual=[[round(float(v), 6) for v in row] for row in r],
        depth=[round(float(v), 6) for v in b],
        residual_identity_distance=float(torch.linalg.matrix_norm(r - torch.eye(n))),
        residual_doubly_stochastic_distance=stochastic,
        dynamic_scale=[float(v) for v in site.dynamic_scale.detach().cpu()] if dynamic else None,
        dynamic_proj_norm=float(site.dynamic_proj.detach().float().norm()) if dynamic else None,
    )


def hc_layers(model: Any) -> list[torch.nn.Module]:
    """The converted decoder layers of ``model``, in order."""
    return [m for m in model.modules() if isinstance(m, HCDecoderLayerMixin)]


@torch.no_grad()
def stream_divergence(model: Any, input_ids: torch.Tensor) -> list[float]:
    """Stream divergence after each layer that outputs streams (all but the last)."""
    found: list[float] = []

    def hook(_module: Any, _args: Any, output: Any) -> None:
        h = output[0] if isinstance(output, tuple) else output
        if h.dim() != input_ids.dim() + 2:  # the last layer has reduced its streams already
            return
        h = h.float()
        mean = h.mean(dim=-2, keepdim=True)
        spread = (h - mean).norm() / (math.sqrt(h.shape[-2]) * mean.norm().clamp_min(1e-30))
        found.append(float(spread))

    handles = [layer.register_forward_hook(hook) for layer in hc_layers(model)]
    try:
        model(input_ids)
    finally:
        for handle in handles:
            handle.remove()
    return found


def inspect_model(model: Any, tokenizer: Any = None) -> InspectionReport:
    """Inspect a converted model in memory."""
    if not is_converted(model):
        raise NotConvertedError("the model has no hyper-connections to inspect")
    sites = [site_report(i, site) for i, layer in enumerate(hc_layers(model)) for site in layer.hyper_connections]
    ids = probe_ids(model, tokenizer=tokenizer, batch=CHECKPOINT_BATCH, length=CHECKPOINT_LENGTH)
    return InspectionReport(
        variant=model.hc_config.variant,
        num_streams=model.hc_config.num_streams,
        sites=sites,
        stream_divergence=stream_divergence(model, ids),
    )


def inspect_checkpoint(path: str | os.PathLike) -> InspectionReport:
    """Inspect a converted checkpoint directory."""
    require_converted_dir(path)
    return inspect_model(load_converted(path, dtype=torch.float32), load_tokenizer(str(path)))
