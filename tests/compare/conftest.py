"""Fixtures for the compare tests: a tiny plain llama saved with the demo tokenizer, a small corpus."""

from __future__ import annotations

from pathlib import Path

import pytest

from hc_retrofit.compare import CompareSpec
from tests.train.conftest import _one_thread, cache_dir, corpus, tiny_lm, tokenizer  # noqa: F401  (shared fixtures)


@pytest.fixture(scope="session")
def plain_model(tmp_path_factory, tokenizer) -> Path:  # noqa: F811
    path = tmp_path_factory.mktemp("model") / "tiny-llama"
    tiny_lm(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_spec(out: Path, model: Path, corpus: Path, cache_dir: str, **overrides) -> CompareSpec:  # noqa: F811
    """2 x 32-token sequences, 4 steps, eval at 0, 2, 4; mHC n=2; two LRs per arm."""
    values = dict(
        model=str(model),
        data=str(corpus),
        out=str(out),
        variants=("mhc",),
        streams=(2,),
        seeds=(0,),
        lr_grid=(3e-4, 1e-2),
        hc_lr_multiplier_grid=(10.0,),
        validation_fraction=0.1,
        heldout_fraction=0.1,
        train=dict(
            block_size=32,
            batch_size=2,
            max_steps=4,
            warmup_steps=1,
            eval_every=2,
            eval_batches=2,
            save_every=0,
            cache_dir=cache_dir,
        ),
    )
    values.update(overrides)
    return CompareSpec(**values)
