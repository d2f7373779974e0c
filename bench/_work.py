"""Counting the work of tensor operations: elements read and written, and operator calls.

Not part of the package: ``bench/work.py`` and the tests import this file as a sibling module.

A :class:`WorkCounter` is a ``TorchDispatchMode``: every aten operator that runs inside it (the
forward *and* the autograd engine's backward, which dispatches the same way) is recorded with the
elements it reads and writes. This is machine independent: the same code on any CPU or GPU moves
the same elements; what a faster machine changes is only how long each element takes. Rules:

* a tensor argument is read, a tensor result is written, each counted by its *distinct* elements
  (a stride-0 broadcast view of ``h`` counts as ``h``: ``expand`` costs nothing);
* views (``view``, ``expand``, ``transpose``, ...) move nothing and are not counted as work, but
  are counted as calls (``calls``: every operator dispatched, what batch-1 decode pays for);
* an ``out=`` argument is written, not read; an in-place operator reads and writes ``self``;
* allocations (``empty``) write nothing.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

_NO_WORK = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "lift_fresh", "alias"}


def distinct_elements(t: torch.Tensor) -> int:
    """Elements of ``t`` in distinct memory locations (dims of stride 0 count once)."""
    if t.numel() == 0:
        return 0
    return math.prod(s for s, st in zip(t.shape, t.stride(), strict=True) if st != 0 or s == 1)


@dataclass
class Work:
    """Elements read and written, operator calls and the operators that did the most traffic."""

    read: int = 0
    written: int = 0
    calls: int = 0
    by_op: Counter = field(default_factory=Counter)

    @property
    def moved(self) -> int:
        return self.read + self.written

    def __sub__(self, other: Work) -> Work:
        return Work(
            self.read - other.read, self.written - other.written, self.calls - other.calls, self.by_op - other.by_op
        )


class WorkCounter(TorchDispatchMode):
    """Record the elements every aten operator reads and writes (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.work = Work()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.work.calls += 1
        name = func._schema.name.split("::")[-1]
        if func.is_view or name in _NO_WORK or name.endswith("_view"):
            return out
        written_args = {
            a.name
            for a in func._schema.arguments
            if a.alias_info is not None and a.alias_info.is_write and a.kwarg_only
        }  # out= arguments: written (counted through the result), not read
        read = 0
        for a, value in zip(func._schema.arguments, args, strict=False):
            read += _elements(value) if a.name not in written_args else 0
        for key, value in kwargs.items():
            read += _elements(value) if key not in written_args else 0
        written = _elements(out)
        self.work.read += read
        self.work.written += written
        self.work.by_op[name] += read + written
        return out


def _elements(value) -> int:
    leaves, _ = tree_flatten(value)
    return sum(distinct_elements(t) for t in leaves if isinstance(t, torch.Tensor))
