"""On a CUDA GPU (``bash bench/gpu_check.sh``): half-precision exactness, training (eager and
``--compile``) and decoding through the KV cache. FSDP2 with a bf16 ``MixedPrecisionPolicy`` is
checked on GPUs by ``tests/train/test_fsdp_precision.py``.

Every test is marked ``cuda`` and skipped, with the reason printed, where no GPU is.
"""

from __future__ import annotations

import copy

import pytest
import torch

import hc_retrofit
from hc_retrofit import HCConfig
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
