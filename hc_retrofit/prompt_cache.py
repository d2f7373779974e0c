"""The KV cache a full-sequence forward filled, handed on to ``generate()`` so the prompt runs once.

A check of exactness runs a model on the probe batch (every position's logits) and then its greedy
continuation through the KV cache. That forward already filled the model's cache with the whole
prompt; cropped by its last position, ``generate()`` continues from it and runs that one position
through the cache instead of the whole prompt once more (same tokens; logits within float error).
"""

from __future__ import annotations

from typing import Any


def prompt_cache(output: Any, length: int) -> dict[str, Any]:
    """``generate()``'s keyword argument for the cache in model ``output`` cropped to its first ``length``
    positions (``cache``; ``past_key_values`` before transformers 5), or ``{}`` when there is none of
    ``length + 1`` positions or it cannot be cropped (``generate()`` then runs the whole prompt)."""
    name = "cache" if "cache" in getattr(output, "keys", tuple)() else "past_key_values"
    cache = output.get(name) if hasattr(output, "get") else None
    try:
        if length < 1 or cache is None or cache.get_seq_length() != length + 1:
            return {}
        cache.crop(-1)  # a negative count removes that many positions, in every transformers version
    except Exception:  # a cache kind that cannot be cropped
        return {}
    return {name: cache}
