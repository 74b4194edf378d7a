"""Errors that stop a run for a reason the user must see, with a one-line message (no traceback).

`ConfigError` is bad input, raised before a run starts; `check` is the one helper that raises it.
`RunError` and its kind are raised while a run is going. `first_line` cuts any exception's
message to one line for such reports.
"""

from __future__ import annotations


def first_line(err: BaseException) -> str:
    """The first line of an exception's message, for one-line reports ("" if it has none)."""
    return (str(err).strip().splitlines() or [""])[0]


class ConfigError(ValueError):
    """A configuration or input error with a one-line, user-facing message."""


def check(cond: bool, message: str) -> None:
    """Raise `ConfigError(message)` unless `cond`; the message names the field and the fix."""
    if not cond:
        raise ConfigError(message)


def check_choice(value: str, choices: tuple[str, ...], name: str) -> None:
    """`value` must be one of `choices`; the message lists them."""
    check(value in choices, f"{name}: unknown value '{value}'; choose one of {', '.join(choices)}")


class ConfigWarning(UserWarning):
    """A setting that runs but is unlikely to be what was meant (the message says why and the fix)."""


class RunError(RuntimeError):
    """A run stopped on purpose; the message names the setting that decides it and the fix."""


class NonFiniteError(RunError):
    """Parameters, loss or gradients are NaN/Inf where the run cannot go on."""
