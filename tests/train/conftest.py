"""Fixtures for the training tests: a tiny llama with the bundled demo tokenizer, a small corpus."""

from __future__ import annotations

from pathlib import Path

import pytest

from hc_retrofit.demo import corpus_path, demo_model, demo_tokenizer
from hc_retrofit.train.recipe import TrainConfig


@pytest.fixture(scope="session")
def tokenizer():
    return demo_tokenizer()


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """~24 KB of the bundled Shakespeare (paragraph documents), enough for a few hundred blocks of 32."""
    text = corpus_path().read_text()
    cut = text.rfind("\n\n", 0, 24_000)
    path = tmp_path_factory.mktemp("corpus") / "shakespeare_small.txt"
    path.write_text(text[:cut] + "\n")
    return path


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("hf_datasets_cache"))


def free_port() -> int:
    """A free TCP port for a launched process group's rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_lm(tokenizer, seed: int = 0):
    return demo_model("tiny", vocab_size=len(tokenizer), seed=seed)


def tiny_config(out: Path, corpus: Path, cache_dir: str, **overrides) -> TrainConfig:
    """Small, fast settings: 2 x 32-token sequences per step, a few steps, no progress bar."""
    values = dict(
        data=str(corpus),
        out=str(out),
        block_size=32,
        batch_size=2,
        max_steps=6,
        lr=3e-3,
        warmup_steps=1,
        eval_fraction=0.1,
        eval_every=0,
        eval_batches=2,
        save_every=0,
        cache_dir=cache_dir,
        progress=False,
        streams=4,
        variant="mhc",
    )
    values.update(overrides)
    return TrainConfig(**values)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread, and far faster than 2 threads on a busy 2-core box."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
