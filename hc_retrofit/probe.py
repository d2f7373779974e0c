"""A small fixed probe batch for comparing and inspecting models (verify, inspect).

Real text when a tokenizer is available (greedy continuations of text are what users look at),
otherwise seeded random token ids. Every row has the same length, so no padding is needed.
"""

from __future__ import annotations

from typing import Any

import torch

PROBE_TEXTS = (
    "Once upon a time, there was a little girl who loved to play outside.",
    "The quick brown fox jumps over the lazy dog, and then it runs into the forest.",
    "In the beginning, the model was exactly the same as before, and nobody could tell.",
    "She looked at the sky and said that tomorrow would be a good day for a long walk.",
)


def probe_batch(tokenizer: Any, vocab_size: int, *, batch: int = 4, length: int = 16, seed: int = 0) -> torch.Tensor:
    """``(batch, length)`` token ids: tokenized :data:`PROBE_TEXTS` (cut to a common length) or random ids."""
    if tokenizer is not None:
        rows = [tokenizer(text, add_special_tokens=True)["input_ids"] for text in PROBE_TEXTS[:batch]]
        common = min(length, *(len(r) for r in rows))
        if common >= 4 and all(0 <= t < vocab_size for r in rows for t in r[:common]):
            return torch.tensor([r[:common] for r in rows], dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    low = min(3, vocab_size - 1)  # skip the usual special ids (pad/bos/eos)
    return torch.randint(low, vocab_size, (batch, length), generator=generator)
