"""Optimiser and schedule: AdamW with its own parameter group for hyper-connection parameters.

Groups (built from parameter *names*, which survive DDP and FSDP with ``use_orig_params``):

* ``base/decay``     -- matrices of the original model, weight decay ``weight_decay``;
* ``base/no_decay``  -- biases, norms (1-D tensors), no weight decay;
* ``hc``             -- every parameter under a ``hyper_connections`` module: learning rate
  ``lr * hc_lr_multiplier`` and no weight decay (decay would pull the width/residual logits and
  the Sinkhorn logits towards 0, i.e. away from the exact initialisation, for no benefit).

The schedule is linear warmup then cosine decay to ``min_lr_ratio * lr``, applied to every group
as a factor, so the HC group keeps its multiplier throughout.
"""

from __future__ import annotations

import math

import torch
from torch import nn

HC_MARKER = "hyper_connections"


def is_hc_parameter(name: str) -> bool:
    """Whether the parameter called ``name`` belongs to a hyper-connection site."""
    return HC_MARKER in name.split(".")


def param_groups(model: nn.Module, *, lr: float, weight_decay: float, hc_lr_multiplier: float) -> list[dict]:
    """AdamW parameter groups (see the module docstring); empty groups are left out."""
    groups: dict[str, dict] = {
        "base/decay": {"params": [], "names": [], "lr": lr, "weight_decay": weight_decay},
        "base/no_decay": {"params": [], "names": [], "lr": lr, "weight_decay": 0.0},
        "hc": {"params": [], "names": [], "lr": lr * hc_lr_multiplier, "weight_decay": 0.0},
    }
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if is_hc_parameter(name):
            key = "hc"
        elif p.ndim >= 2:
            key = "base/decay"
        else:
            key = "base/no_decay"
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return [{"group": k, **g} for k, g in groups.items() if g["params"]]


def build_optimizer(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float = 0.1,
    hc_lr_multiplier: float = 10.0,
    betas: tuple[float, float] = (0.9, 0.95),
) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`. Each group keeps ``group`` (its name) and ``names``."""
    groups = param_groups(model, lr=lr, weight_decay=weight_decay, hc_lr_multiplier=hc_lr_multiplier)
    fused = all(p.is_cuda for g in groups for p in g["params"]) or None
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-8, fused=fused)


def lr_factor(step: int, *, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of every group's base LR at optimiser step ``step`` (0-based)."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, *, warmup_steps: int, max_steps: int, min_lr_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup + cosine decay (:func:`lr_factor`), stepped once per optimiser step."""
    warmup_steps = min(warmup_steps, max_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(step, warmup_steps=warmup_steps, max_steps=max_steps, min_lr_ratio=min_lr_ratio),
    )


def drop_base_gradients(optimizer: torch.optim.Optimizer) -> None:
    """For ``--hc-warmup-steps``: forget the base gradients so AdamW skips those parameters.

    AdamW leaves a parameter whose ``grad`` is ``None`` untouched (no moment update, no weight
    decay), so the base model stays frozen while the HC parameters learn. Gradients are still
    computed (and, under DDP, all-reduced): freezing via ``requires_grad`` would change the set
    of parameters DDP/FSDP expect mid-run.
    """
    for group in optimizer.param_groups:
        if group.get("group") != "hc":
            for p in group["params"]:
                p.grad = None


def group_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Current learning rate of each named group."""
    return {g.get("group", str(i)): g["lr"] for i, g in enumerate(optimizer.param_groups)}
