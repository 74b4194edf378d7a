"""Rewards: grade a completion against a reference answer.

Pure functions of strings. Model text is never evaluated (only regular expressions and
math-verify's LaTeX/expression parser read it), and every reward returns a float in [0, 1]
without raising on any input (None, bytes, empty, huge or garbage strings).

- `exact_match_reward`: the synthetic tasks (`#### <number>` against a number).
- `math_reward`: the real datasets, graded by math-verify (boxed answers, fractions, LaTeX,
  thousands separators, `####` answers, `$x=3$` against `3`).

How `math_reward` stays bounded in time. math-verify's own timeouts use `signal.alarm`, which only
works on a process's main thread. Inputs are first cut to the last `MAX_COMPLETION_CHARS`
characters of the completion and the first `MAX_REFERENCE_CHARS` of the reference. Then:
- on the main thread (the training loop, DDP ranks, worker processes of a pool), math-verify runs
  in-process with its alarm-based timeouts of `GRADE_TIMEOUT_S` seconds per parse and per verify;
- on any other thread, the call is sent to one long-lived grading child process (started on first
  use), which grades on its own main thread with the same alarms; the caller waits at most
  `GUARD_TIMEOUT_S` seconds and kills and replaces a child that does not answer. A thread-only
  guard cannot stop a runaway sympy computation; a process can be killed.
"""

from __future__ import annotations

import functools
import re
import signal
import threading
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


# ---------------------------------------------------------------- math-verify grading

MAX_COMPLETION_CHARS = 4000
"""Only the tail of a completion is graded: the final answer is at the end."""
MAX_REFERENCE_CHARS = 1000
GRADE_TIMEOUT_S = 2
"""math-verify's alarm timeout (whole seconds) for each parse and for the comparison."""
GUARD_TIMEOUT_S = 10.0
"""Off the main thread: the most a caller waits for the grading process before killing it."""

_BOXED = "\\boxed"


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`) in `text`, braces balanced; else None."""
    opens = [m.end() - 1 for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    if not opens:
        return None
    closing, stack = {}, []  # one pass: position of each `{` -> its matching `}`
    for i, c in enumerate(text):
        if c == "{":
            stack.append(i)
        elif c == "}" and stack:
            closing[stack.pop()] = i
    for brace in reversed(opens):
        if brace in closing:
            return text[brace + 1 : closing[brace]].strip()
    return None


def _math_candidate(completion: str) -> str:
    """The text math-verify reads: the last boxed answer; else the answer after the last `####`;
    else the completion (math-verify then takes its last expression)."""
    boxed = last_boxed(completion)
    if boxed is not None:
        return f"{_BOXED}{{{boxed}}}"
    if ANSWER_MARKER in completion:
        answer = extract_answer(completion)
        if answer is not None:
            return f"{_BOXED}{{{answer}}}"
    return completion


def _reference_text(answer: str) -> str:
    """A reference answer as LaTeX math-verify parses unambiguously (`1,000`, `\\frac12`, `(1,2)`)."""
    answer = answer.strip()
    if ANSWER_MARKER in answer:
        answer = extract_answer(answer) or ""
    if _BOXED in answer:
        return answer
    return f"{_BOXED}{{{answer.strip('$').strip()}}}"


@functools.lru_cache(maxsize=4096)
def _parse_reference(text: str, timeout: int | None):
    from math_verify import parse

    return parse(text, parsing_timeout=timeout)


def _grade(completion: str, answer: str, timeout: int | None) -> float:
    """math-verify on already bounded strings; 0.0 on any failure."""
    from math_verify import parse, verify

    try:
        gold = _parse_reference(_reference_text(answer), timeout)
        if not gold:
            return 0.0
        pred = parse(_math_candidate(completion), parsing_timeout=timeout)
        if not pred:
            return 0.0
        return 1.0 if verify(gold, pred, timeout_seconds=timeout) else 0.0
    except Exception:
        return 0.0


def _on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGALRM")


def math_reward(completion: str, answer: str) -> float:
    """1.0 if math-verify finds the completion's final answer equivalent to `answer`, else 0.0.

    `answer` is a final answer (`72`, `\\frac{1}{2}`, `1,000`); the completion's answer is its last
    `\\boxed{}`, else the text after its last `####`, else math-verify's own extraction (last
    LaTeX or plain expression). Thread-safe, bounded in time (see the module docstring), and
    0.0 on any error or unreadable input.
    """
    completion, reference = _as_text(completion), _as_text(answer)
    if completion is None or reference is None or not completion.strip() or not reference.strip():
        return 0.0
    completion = completion[-MAX_COMPLETION_CHARS:].replace("\x00", "")
    reference = reference[:MAX_REFERENCE_CHARS].replace("\x00", "")
    if _on_main_thread():
        return _grade(completion, reference, GRADE_TIMEOUT_S)
    return _GUARD.grade(completion, reference)


def serve_grading() -> None:
    """The grading process: JSON lines `[completion, answer]` on stdin, one score per line out.

    Runs on the child's main thread, where math-verify's alarms work. The protocol uses a private
    copy of stdout; anything a library prints goes to stderr instead."""
    import json
    import os
    import sys

    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    _grade("\\boxed{\\frac{1}{2}}", "0.5", GRADE_TIMEOUT_S)  # first use loads the parsers
    out.write("ready\n")
    for line in sys.stdin:
        try:
            completion, answer = json.loads(line)
            score = _grade(str(completion), str(answer), GRADE_TIMEOUT_S)
        except Exception:
            score = 0.0
        out.write(f"{score}\n")


class _GradingProcess:
    """One lazily started grading child (`python -c serve_grading()`) shared by all non-main
    threads. A plain subprocess rather than multiprocessing: nothing of the caller's `__main__`
    is re-imported, so it works from scripts without a main guard, notebooks and stdin."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc = None
        self._warned = False

    def _start(self) -> None:
        import subprocess
        import sys

        self._proc = subprocess.Popen(
            [sys.executable, "-c", "from oisd_lab.rewards import serve_grading; serve_grading()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )
        if self._read_line(120.0) != "ready":  # start-up imports, not grading
            self._stop()
            raise RuntimeError("the grading process did not start")

    def _read_line(self, timeout: float) -> str | None:
        import os
        import select
        import time

        fd, deadline, data = self._proc.stdout.fileno(), time.monotonic() + timeout, b""
        while not data.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                return None
            data += chunk
        return data.decode().strip()

    def _stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(timeout=5)
            for stream in (self._proc.stdin, self._proc.stdout):
                stream.close()
        self._proc = None

    def grade(self, completion: str, answer: str) -> float:
        import json

        with self._lock:
            try:
                if self._proc is None or self._proc.poll() is not None:
                    self._stop()
                    self._start()
                self._proc.stdin.write((json.dumps([completion, answer]) + "\n").encode())
                self._proc.stdin.flush()
                line = self._read_line(GUARD_TIMEOUT_S)
                if line is None:  # stuck in a computation the alarms could not interrupt
                    self._stop()
                    return 0.0
                return float(line)
            except Exception as err:
                self._stop()
                if not self._warned:
                    import warnings

                    warnings.warn(f"math_reward: off-main-thread grading failed ({err}); scoring 0.0",
                                  stacklevel=2)
                    self._warned = True
                return 0.0


_GUARD = _GradingProcess()


def format_reward(completion: str, answer: str, length: int = 0, options=None) -> float:
    """`format`: 1 when the completion states a final answer a grader can read (a \\boxed{...}
    or an `Answer:` / final-number form, as `extract_answer` reads it), else 0."""
    return float(last_boxed(completion) is not None or extract_answer(completion) is not None)


def overlong_penalty(completion: str, answer: str, length: int, options) -> float:
    """`overlong`: DAPO's soft overlong punishment with L_max = grpo.max_completion_length and
    L_cache = grpo.overlong_buffer: 0 up to L_max - L_cache tokens, then falling linearly to -1
    at L_max, -1 beyond; 0 when the buffer is 0."""
    limit, buffer = options.max_completion_length, options.overlong_buffer
    if buffer <= 0 or length <= limit - buffer:
        return 0.0
    if length > limit:
        return -1.0
    return (limit - buffer - length) / buffer
