"""Bytes held by live tensors while code runs, for fake tensors as for real ones.

`MemoryTrace` is a dispatch mode: every tensor an operator returns has its storage counted once,
under the label that is current when it is allocated, and uncounted when the storage dies. The
peak and the live bytes per label at the peak are what a caching allocator would have to hold
(before fragmentation). Under `FakeTensorMode` no memory is used, so a whole training step of a
large model can be traced on a CPU in seconds.
"""

from __future__ import annotations

import contextlib
import weakref
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class MemoryTrace(TorchDispatchMode):
    """Live bytes, peak bytes and the live bytes per label at the peak."""

    def __init__(self, label: str = "other") -> None:
        super().__init__()
        self.labels = [label]
        self.live: dict[int, tuple[str, int]] = {}
        self._refs: dict[int, weakref.ref] = {}
        self.by_label: Counter = Counter()
        self.current = self.peak = 0
        self.at_peak: dict[str, int] = {}
        self.during: tuple[str, ...] = (label,)
        """The labels open when the peak was reached, outermost first (what the code was doing)."""

    @contextlib.contextmanager
    def label(self, name: str):
        """Tensors allocated inside are counted under `name`."""
        self.labels.append(name)
        try:
            yield
        finally:
            self.labels.pop()

    def relabel(self, tensor: torch.Tensor, name: str) -> None:
        """Count an already traced tensor under `name` from now on (e.g. a gradient once stored)."""
        key = _key(tensor)
        if key in self.live:
            old, nbytes = self.live[key]
            self.by_label[old] -= nbytes
            self.by_label[name] += nbytes
            self.live[key] = (name, nbytes)

    def reset_peak(self) -> None:
        self.peak, self.at_peak, self.during = self.current, dict(self.by_label), tuple(self.labels)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # An output on an input's storage (a view, an in-place op) allocates nothing, also when
        # that input was made before tracing began (parameters, the rollout).
        inputs = {_key(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and _key(t) not in inputs:
                self._count(t)
        return out

    def _count(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = _key(tensor)
        if key in self.live:
            return
        nbytes = storage.nbytes()
        name = self.labels[-1]
        self.live[key] = (name, nbytes)
        self._refs[key] = weakref.ref(storage, lambda _, k=key: self._free(k))
        self.by_label[name] += nbytes
        self.current += nbytes
        if self.current > self.peak:
            self.peak, self.at_peak, self.during = self.current, dict(self.by_label), tuple(self.labels)

    def _free(self, key: int) -> None:
        name, nbytes = self.live.pop(key, (None, 0))
        self._refs.pop(key, None)
        if name is not None:
            self.by_label[name] -= nbytes
            self.current -= nbytes


def _key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata
