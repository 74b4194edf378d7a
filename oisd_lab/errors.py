"""Errors that stop a run for a reason the user must see, with a one-line message (no traceback).

`ConfigError` (bad input, raised before a run starts) lives in `config.py`; these are raised
while a run is going. `first_line` cuts any exception's message to one line for such reports.
"""

from __future__ import annotations


def first_line(err: BaseException) -> str:
    """The first line of an exception's message, for one-line reports ("" if it has none)."""
    return (str(err).strip().splitlines() or [""])[0]


class RunError(RuntimeError):
    """A run stopped on purpose; the message names the setting that decides it and the fix."""


class NonFiniteError(RunError):
    """Parameters, loss or gradients are NaN/Inf where the run cannot go on."""
