"""On a CUDA GPU (``bash bench/gpu_check.sh``): half-precision exactness, training (eager and
``--compile``), FSDP2 with a bf16 ``MixedPrecisionPolicy``, and decoding through the KV cache.

Every test is marked ``cuda`` and skipped, with the reason printed, where no GPU is.
"""

from __future__ import annotations

import copy
import os
import socket

import pytest
import torch

import hc_retrofit
from hc_retrofit import HCConfig
from hc_retrofit.modeling.patch import decoder_layers
from hc_retrofit.modeling.site import HyperConnection
from tests.tiny import VOCAB, tiny_model
from tests.train.conftest import _one_thread, cache_dir, corpus, tiny_config, tiny_lm, tokenizer  # noqa: F401

pytestmark = pytest.mark.cuda
VARIANTS = ["static", "dynamic", "mhc"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", VARIANTS)
def test_half_precision_conversion_on_gpu_is_exact_and_decodes_the_same_text(variant, dtype):
    base = tiny_model("llama-gqa-untied").to("cuda", dtype)
    model = hc_retrofit.convert(copy.deepcopy(base), HCConfig(num_streams=4, variant=variant))  # proves it
    assert all(p.dtype == torch.float32 and p.is_cuda for n, p in model.named_parameters() if "hyper_conn" in n)
    ids = torch.randint(3, VOCAB, (2, 12), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        logits, ref = model(ids).logits.float(), base(ids).logits.float()
    assert (logits - ref).abs().max() <= 0.05 * ref.abs().max()
    for cache in (None, "static"):  # decoding through the (dynamic, then static) KV cache
        kwargs = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0, "cache_implementation": cache}
        assert torch.equal(model.generate(ids, **kwargs), base.generate(ids, **kwargs))


@pytest.mark.parametrize("compile_", [False, True])
def test_train_steps_on_gpu_eager_and_compiled(tokenizer, corpus, cache_dir, tmp_path, compile_):  # noqa: F811
    from hc_retrofit.train import train
    from hc_retrofit.train.metrics import read_metrics

    base = tiny_lm(tokenizer)
    runs = {}
    for name, compiled in (("eager", False), ("run", compile_)):
        cfg = tiny_config(tmp_path / name, corpus, cache_dir, max_steps=4, mixed_precision="bf16", compile=compiled)
        runs[name] = train(cfg, model=copy.deepcopy(base), tokenizer=tokenizer)
        losses = [r["loss"] for r in read_metrics(tmp_path / name) if "loss" in r]
        assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert runs["run"].final_eval_loss == pytest.approx(runs["eager"].final_eval_loss, abs=2e-2)


def _one_process_group() -> None:
    if torch.distributed.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1")
    torch.distributed.init_process_group("nccl", rank=0, world_size=1)


@pytest.mark.parametrize("variant", VARIANTS)
def test_fsdp2_with_a_bf16_policy_keeps_hc_coefficients_float32(variant, monkeypatch):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    _one_process_group()
    base = tiny_model("llama-gqa-untied").cuda().train()
    model = hc_retrofit.convert(copy.deepcopy(base), HCConfig(num_streams=4, variant=variant)).train()
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    seen: list[torch.dtype] = []
    original = HyperConnection._coefficients

    def spy(self, streams, source=None):
        c = original(self, streams, source)
        seen.extend(t.dtype for t in (c.a, c.r, c.b))
        return c

    monkeypatch.setattr(HyperConnection, "_coefficients", spy)
    ids = torch.randint(3, VOCAB, (2, 12), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    loss = model(ids, labels=ids).loss
    loss.backward()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref = base(ids, labels=ids).loss
    assert seen and set(seen) == {torch.float32}
    assert abs(loss.item() - ref.item()) <= 2e-2 * abs(ref.item())
    grads = [p.grad for n, p in model.named_parameters() if "hyper_connections" in n]
    assert grads and all(g is not None and g.dtype == torch.float32 for g in grads)
