"""Synthetic inputs and a memory probe shared by the planner and the benchmarks: a rollout of
random tokens at a given shape, a tokenizer that is only a vocabulary size, and the peak bytes
allocated by a function (torch.profiler CPU memory events)."""

from __future__ import annotations

import contextlib
import os
import sys

import torch

from .rollout import Rollout


def synthetic_rollout(tokenizer, batch: int, prompt_len: int, completion_len: int, seed: int = 0):
    """A rollout of random printable tokens, every completion exactly `completion_len` long."""
    gen = torch.Generator().manual_seed(seed)
    low = 3  # after pad, bos, eos: never ends a completion early
    ids = torch.randint(low, len(tokenizer), (batch, prompt_len + completion_len), generator=gen)
    texts = ["x" * completion_len] * batch
    return Rollout(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        completion_mask=torch.ones(batch, completion_len),
        prompt_length=prompt_len,
        texts=texts,
        truncated=torch.ones(batch, dtype=torch.bool),
    )


class VocabOnly:
    """A stand-in tokenizer that only knows its vocabulary size (all a synthetic rollout needs)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


@contextlib.contextmanager
def _native_stderr_silenced():
    """File descriptor 2 to /dev/null: the profiler's C++ side prints its own start/stop lines there."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def profiler_peak(fn) -> int:
    """Peak bytes held by tensors allocated inside `fn()` (CPU allocator events of torch.profiler).
    The profiler's own start/stop lines are kept off stderr; what `fn` writes there is not."""
    with profiled_peak() as peak:
        fn()
    return peak["bytes"]


@contextlib.contextmanager
def profiled_peak():
    """`profiler_peak` of the block: the dict it yields holds the peak as "bytes" after the block."""
    # on use: the profiler is loaded only when a peak is measured
    from torch.profiler import ProfilerActivity, profile

    prof, out = profile(activities=[ProfilerActivity.CPU], profile_memory=True), {}
    with _native_stderr_silenced():
        prof.start()
    try:
        yield out
    finally:
        with _native_stderr_silenced():
            prof.stop()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    cur = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        cur += event.nbytes()
        peak = max(peak, cur)
    out["bytes"] = peak
