"""The one private torch API the shipped modeling code uses, named in one place.

Checked against torch 2.13.0; ``tests/test_private_api.py`` fails when it disappears.
This module ships inside checkpoints, so it imports only torch.
"""

from __future__ import annotations

import torch


def version_counter(tensor: torch.Tensor) -> int:
    """How many times ``tensor`` was modified in place (its autograd version counter).

    Private: ``Tensor._version`` (torch 2.13.0). Every in-place op (an optimizer step,
    ``load_state_dict``, ``copy_`` under ``no_grad``) bumps it, so it tells a cache that a
    parameter changed without reading its values; torch exposes the counter under no public
    name. Raises ``RuntimeError`` for an inference tensor, which has no counter.
    """
    return tensor._version


def version_counters(tensors: list[torch.Tensor]) -> list[int]:
    """:func:`version_counter` of each of ``tensors``, in one call (a per-token cache check reads a
    site's few parameters: one Python call instead of one per parameter)."""
    return [t._version for t in tensors]
