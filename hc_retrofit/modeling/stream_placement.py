"""Where a converted layer's streams are updated: beside the layer (in its exit hooks) or by the layer's own adds.

Beside the layer, each site's exit hook computes ``H' = R H + b (x) y`` together with the next
site's width connection, and the layer's residual adds act on ``(B, T, D)`` tensors nobody reads:
fewer passes over the streams. That is exact only when the layer's output is its input plus its
exits' outputs, added unchanged. The structure decides it once, at convert time
(:func:`recompute_allowed`, :func:`dropout_keys`, :func:`dropouts_outside_branches`, stored on the
layer); :func:`beside_layer` and :func:`recomputes` read those per call, with no graph inspection,
so ``torch.compile`` traces them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .families import Block


def recompute_allowed(block: Block, multiplier: float) -> bool:
    """Whether the block's structure lets the streams be kept beside the layer (:func:`beside_layer`):
    its output is its input plus each site's one exit output, added unchanged, site after site.

    True for sequential, sandwich and post-norm blocks with one exit per site and no residual
    multiplier; dropout between an exit and the add is checked per call.
    """
    return (
        block.kind in ("sequential", "sandwich", "post_norm")
        and all(len(site.exits) == 1 for site in block.sites)
        and multiplier == 1.0
    )


def dropout_keys(config: Any) -> tuple[str, ...]:
    """The config's dropout probabilities (``*dropout*``, ``*pdrop*``) a layer's functional dropout
    may use (all but the ones of the embeddings and classification heads, outside the layers)."""
    return tuple(
        k
        for k, v in vars(config).items()
        if ("dropout" in k or "pdrop" in k)
        and not any(outside in k for outside in ("classifier", "summary", "embd", "embed"))
        and isinstance(v, (int, float))
        and not isinstance(v, bool)
    )


def dropouts_outside_branches(layer: nn.Module, block: Block) -> tuple[nn.Dropout, ...]:
    """The layer's dropout modules that are not inside an entry or exit module (they may act on the
    branch output between the exit and the add)."""
    inside = {
        id(m)
        for spec in block.sites
        for name in spec.entries + spec.exits
        if isinstance(root := getattr(layer, name, None), nn.Module)
        for m in root.modules()
    }
    return tuple(m for m in layer.modules() if isinstance(m, nn.modules.dropout._DropoutNd) and id(m) not in inside)


def beside_layer(layer: nn.Module) -> bool:
    """Whether this call keeps the streams beside the layer: each site's depth connection
    ``H' = R H + b (x) y`` computed in its exit hook (with the next site's width connection), the
    layer's own residual adds left to act on ``(B, T, D)`` tensors nobody reads.

    That is exact when the layer's output is its input plus the exits' outputs, added unchanged:
    decided at convert time from the structure (``_hc_recompute``, :func:`recompute_allowed`: a
    sequential, sandwich or post-norm block, one exit per site, no residual multiplier; the proof
    checks the result). Dropout is the one thing that may sit between an exit and the add (phi3's
    ``resid_attn_dropout``, falcon's ``dropout_add``), so a training layer with any active dropout
    outside its branches lets the layer add the streams itself.
    """
    if not layer._hc_recompute:
        return False
    if not layer.training:
        return True
    config = layer._hc_config
    return not any(m.p > 0 for m in layer._hc_dropouts) and not any(
        getattr(config, k, 0) > 0 for k in layer._hc_dropout_keys
    )


def recomputes(layer: nn.Module) -> bool:
    """Whether this (eager, autograd) call recomputes the second site's streams in backward
    (``H_1 = R_0 H_0 + b_0 (x) y_0``, from tensors saved anyway): when the streams are kept
    beside the layer (:func:`beside_layer`), with autograd and not under ``torch.compile``."""
    return torch.is_grad_enabled() and not torch.compiler.is_compiling() and beside_layer(layer)
