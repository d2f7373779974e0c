"""One process of the FSDP2 mixed-precision check (run by ``accelerate launch``; see test_fsdp_precision.py).

For each variant: a tiny converted llama whose HC parameters are moved off their init to values a
bf16 rounding changes, prepared the way ``hc-retrofit train`` prepares it (``make_accelerator``,
:func:`shard_hyper_connections`, ``accelerator.prepare``) under the launcher's FSDP2 settings. A
forward pre-hook on every decoder layer records, inside forward, the dtype of the layer's own
weights and of its sites' parameters, and whether the sites' coefficients equal those of an
unsharded float32 copy. One forward/backward on this process's half of a batch is compared with
the float32 copy's on the whole batch (FSDP averages the gradients over processes). The main
process writes what it measured as JSON to ``argv[1]``.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from hc_retrofit.demo import demo_model, demo_tokenizer
from hc_retrofit.modeling.config import HCConfig
from hc_retrofit.modeling.patch import decoder_layers, hyper_connection_sites
from hc_retrofit.proof import convert
from hc_retrofit.train.fsdp_precision import shard_hyper_connections
from hc_retrofit.train.recipe import TrainConfig
from hc_retrofit.train.strategy import make_accelerator, strategy_name

VARIANTS = ("static", "dynamic", "mhc")


def _off_init(model: torch.nn.Module, seed: int) -> None:
    """Move every HC parameter to values bf16 cannot hold (the same on every process)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for site in hyper_connection_sites(model):
            for p in site.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen) + 1e-3)


def _coefficients(site: torch.nn.Module) -> list[torch.Tensor]:
    c = site.static_coefficients()
    return [c.a.detach().clone(), c.r.detach().clone(), c.b.detach().clone()]


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def run_variant(accelerator, variant: str, tokenizer) -> dict:
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    model = convert(demo_model("tiny", vocab_size=len(tokenizer), seed=0), HCConfig(num_streams=4, variant=variant))
    _off_init(model, seed=1)
    model.train()
    reference = copy.deepcopy(model).to(device)  # float32, unsharded, on every process
    low = copy.deepcopy(model).to(device, torch.bfloat16)  # one process in bf16 (HC parameters stay float32)
    ref_sites = hyper_connection_sites(reference)
    want_coefficients = [_coefficients(s) for s in ref_sites]
    rounded = copy.deepcopy(reference)  # what the coefficients would be from bf16-rounded parameters
    with torch.no_grad():
        for p in (p for s in hyper_connection_sites(rounded) for p in s.parameters()):
            p.copy_(p.bfloat16().float())
    rounding_changes = max(
        float((g - w).abs().max())
        for s, want in zip(hyper_connection_sites(rounded), want_coefficients, strict=True)
        for g, w in zip(_coefficients(s), want, strict=True)
    )

    sharded_sites = shard_hyper_connections(accelerator, model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    sites = hyper_connection_sites(model)
    index = {id(s): i for i, s in enumerate(sites)}
    seen: list[dict] = []

    def inside_forward(layer, args, kwargs):
        weight = next(p for n, p in layer.named_parameters() if "hyper_connections" not in n)
        for site in layer.hyper_connections:
            params = list(site.parameters())
            coefficients = _coefficients(site)
            want = want_coefficients[index[id(site)]]
            seen.append(
                {
                    "layer_weight_dtype": str(weight.dtype),
                    "site_dtypes": sorted({str(p.dtype) for p in params}),
                    "site_dtensor": any(isinstance(p, DTensor) for p in params),
                    "coefficient_error": max(
                        float((g - w).abs().max()) for g, w in zip(coefficients, want, strict=True)
                    ),
                }
            )

    for layer in decoder_layers(model):
        layer.register_forward_pre_hook(inside_forward, with_kwargs=True)

    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(3, len(tokenizer), (2 * world, 24), generator=gen).to(device)
    mine = ids[2 * rank : 2 * rank + 2]
    loss = model(input_ids=mine, labels=mine).loss
    accelerator.backward(loss)
    global_loss = loss.detach().float().clone()
    dist.all_reduce(global_loss)
    global_loss /= world

    ref_loss = reference(input_ids=ids, labels=ids).loss
    ref_loss.backward()
    low_loss = low(input_ids=ids, labels=ids).loss
    low_loss.backward()
    ref_grads, low_grads = dict(reference.named_parameters()), dict(low.named_parameters())
    grads, finite = {}, True
    for name, p in model.named_parameters():
        grad = _full(p.grad).float()
        finite &= bool(torch.isfinite(grad).all())
        want, single = ref_grads[name].grad, low_grads[name].grad.float()
        grads[name] = {
            "norm": float(want.norm()),
            "fsdp_error": float((grad - want).norm()),
            "single_bf16_error": float((single - want).norm()),
        }
    hc_params = [p for s in sites for p in s.parameters()]
    return {
        "strategy": strategy_name(accelerator, model),
        "mixed_precision": accelerator.mixed_precision,
        "sharded_sites": sharded_sites,
        "sites": len(sites),
        "hc_dtensor_outside_forward": all(isinstance(p, DTensor) for p in hc_params),
        "hc_dtypes_outside_forward": sorted({str(p.dtype) for p in hc_params}),
        "hc_local_fraction": sum(p.to_local().numel() for p in hc_params) / sum(p.numel() for p in hc_params),
        "inside_forward": seen,
        "rounding_changes_coefficients_by": rounding_changes,
        "loss": float(global_loss),
        "reference_loss": float(ref_loss.detach()),
        "single_bf16_loss": float(low_loss.detach()),
        "grads_finite": finite,
        "grads": grads,
    }


def main(out: str) -> None:
    torch.set_num_threads(1)
    accelerator = make_accelerator(TrainConfig(out=str(Path(out).parent)), Path(out).parent)
    tokenizer = demo_tokenizer()
    results = {variant: run_variant(accelerator, variant, tokenizer) for variant in VARIANTS}
    if accelerator.is_main_process:
        Path(out).write_text(json.dumps(results, indent=1))
    accelerator.wait_for_everyone()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
