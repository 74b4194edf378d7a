"""The named phases of a training step, and the observers that subscribe to them.

`OISDModule` opens a phase around each part of its step (`with self.phases("backward"): ...`);
whoever wants to time, measure or label a part subscribes an observer instead of wrapping the
module's methods. An observer is a callable `observer(name)` that returns a context manager
entered for the duration of that phase, or None to let the phase pass. Phases nest ("backward"
runs inside "policy step"), so an observer sees the inner ones inside the outer one. The phases
the module opens, in the order of a step, are listed in docs/architecture.md, section 1.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

Observer = Callable[[str], AbstractContextManager | None]
"""Called with a phase's name as the phase begins; the context manager it returns (if any) is
entered then and left when the phase ends."""


class Phases:
    """Named phases that observers subscribe to; `phases(name)` is the context of one phase."""

    def __init__(self) -> None:
        self.observers: list[Observer] = []

    def subscribe(self, observer: Observer) -> Callable[[], None]:
        """Call `observer` at every phase from now on; returns the function that unsubscribes it."""
        self.observers.append(observer)
        return lambda: self.observers.remove(observer)

    @contextlib.contextmanager
    def subscribed(self, observer: Observer) -> Iterator[Observer]:
        """`observer` subscribed for the duration of the block."""
        unsubscribe = self.subscribe(observer)
        try:
            yield observer
        finally:
            unsubscribe()

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        """Phase `name` for the duration of the block: the observers' contexts are entered in the
        order they subscribed and left in reverse."""
        if not self.observers:
            yield
            return
        with contextlib.ExitStack() as stack:
            for observer in list(self.observers):
                context = observer(name)
                if context is not None:
                    stack.enter_context(context)
            yield


class StepTimer:
    """Wall seconds of the outermost phases of one step as `<key>`, process CPU seconds as
    `<key>_cpu` (a phase met several times sums them), and the step's wall seconds (`total`).

    An observer of `Phases`: `keys` names the timed phases (phase name -> metric key); a phase
    inside another phase is part of the outer one's time."""

    def __init__(self, keys: dict[str, str]) -> None:
        self.keys = keys
        self.start = time.perf_counter()
        self.laps: dict[str, float] = {}
        self.depth = 0

    def __call__(self, name: str) -> AbstractContextManager:
        return self._timed(self.keys.get(name) if self.depth == 0 else None)

    @contextlib.contextmanager
    def _timed(self, key: str | None) -> Iterator[None]:
        self.depth += 1
        start, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.depth -= 1
            if key is not None:
                self.laps[key] = self.laps.get(key, 0.0) + time.perf_counter() - start
                self.laps[f"{key}_cpu"] = self.laps.get(f"{key}_cpu", 0.0) + time.process_time() - cpu

    @property
    def total(self) -> float:
        return time.perf_counter() - self.start
