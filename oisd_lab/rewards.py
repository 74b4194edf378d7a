"""Rewards: grade a completion against a reference answer.

Pure functions of strings. Model text is only matched against regular expressions, never
evaluated, and every reward returns a float in [0, 1] without raising on any input (None,
bytes, empty, huge or garbage strings).
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

ANSWER_MARKER = "####"
MAX_ANSWER_CHARS = 64

_PLAIN_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")
_GROUPED_NUMBER = re.compile(r"[+-]?[0-9]{1,3}(?:,[0-9]{3})+(?:\.[0-9]*)?")


def _as_text(value: object) -> str | None:
    """A str view of `value` (str, bytes or int), or None for anything else."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def extract_answer(text: str) -> str | None:
    """The answer after the LAST `####`: first line, stripped, at most 64 chars; else None."""
    text = _as_text(text)
    if text is None:
        return None
    index = text.rfind(ANSWER_MARKER)
    if index < 0:
        return None
    rest = text[index + len(ANSWER_MARKER) :].lstrip()
    line = rest.split("\n", 1)[0][:MAX_ANSWER_CHARS].strip()
    return line or None


def normalize_number(s: str) -> str | None:
    """Canonical decimal text of a number (`+5`, `5.0`, `1,000`, `-0.50`), or None if not one.

    Integers lose signs on zero and trailing `.0`; decimals lose trailing zeros. A trailing
    period (`35.`) is accepted. Only ASCII digits count.
    """
    s = _as_text(s)
    if s is None or len(s) > MAX_ANSWER_CHARS:
        return None
    s = s.strip()
    if _GROUPED_NUMBER.fullmatch(s):
        s = s.replace(",", "")
    if not _PLAIN_NUMBER.fullmatch(s):
        return None
    try:
        value = Decimal(s)
    except InvalidOperation:
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def exact_match_reward(completion: str, answer: str) -> float:
    """1.0 if the answer extracted from `completion` equals `answer`, else 0.0.

    Both sides are compared as normalised numbers when the reference is a number, otherwise
    as stripped strings. Missing, empty or unreadable answers score 0.0.
    """
    predicted = extract_answer(completion)
    reference = _as_text(answer)
    if predicted is None or reference is None or not reference.strip():
        return 0.0
    gold = normalize_number(reference)
    if gold is not None:
        return 1.0 if normalize_number(predicted) == gold else 0.0
    return 1.0 if predicted == reference.strip() else 0.0
