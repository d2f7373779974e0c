"""Checkpoint directories for the persistence/CLI tests, built from tests/tiny.py models (no Hub).

``word_tokenizer()`` is a tiny word-level tokenizer whose ids fit the tiny models' vocabulary, built
in-test with the ``tokenizers`` library, so checkpoints have a real tokenizer beside the weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from hc_retrofit.equivalence import PROBE_TEXTS
from tests.tiny import VOCAB, tiny_model

HUB_OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


def word_tokenizer() -> Any:
    """A ``PreTrainedTokenizerFast`` over the words of the probe texts (ids < the tiny VOCAB)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for text in PROBE_TEXTS for w in text.replace(",", " ,").replace(".", " .").split()})
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for word in words[: VOCAB - len(vocab)]:
        vocab[word] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


def save_base(case: str, directory: Path, *, tokenizer: bool = True, seed: int = 0) -> Path:
    """Save the tiny random model of ``case`` (and a tokenizer) as a plain checkpoint in ``directory``."""
    model = tiny_model(case, seed=seed)
    model.save_pretrained(directory)
    if tokenizer:
        word_tokenizer().save_pretrained(directory)
    return directory


def train_a_few_steps(model: Any, steps: int = 5, lr: float = 1e-2, seed: int = 0) -> Any:
    """A few AdamW steps on random tokens, so that HC parameters leave their initial values."""
    generator = torch.Generator().manual_seed(seed)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        ids = torch.randint(3, model.config.vocab_size, (2, 12), generator=generator)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def populate_hf_cache(cache: Path, repo_id: str, source: Path, commit: str = "0" * 39 + "1") -> Path:
    """Lay ``source``'s files out as the Hub cache does: ``models--org--name/{snapshots/<commit>,refs/main}``."""
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in source.iterdir():
        if file.is_file():
            shutil.copy2(file, snapshot / file.name)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    return snapshot


def config_json(directory: Path) -> dict[str, Any]:
    return json.loads((directory / "config.json").read_text())
