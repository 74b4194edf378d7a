"""Synthetic math task families with short worked solutions.

Every family is a frozen dataclass whose fields are its difficulty knobs. A problem is a prompt
`"Q: <question>\\nA: "` and a solution such as `"3+4=7 7*5=35 #### 35"`: one `a op b=c` step per
intermediate result, then `#### <answer>`. Solutions stay short because a tiny character-level
model writes them. The held-out split is decided by a stable hash of the prompt (no enumeration):
a prompt is `test` iff `zlib.crc32(prompt) % 10 == 0`.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass, fields
from typing import ClassVar, Literal

Split = Literal["train", "test"]
SPLITS: tuple[str, ...] = ("train", "test")
TEST_MODULUS = 10
_NAMES = ("Tom", "Ann", "Sam", "Kim", "Max", "Eva", "Ben", "Mia")
_ITEMS = ("apples", "pens", "cards", "coins", "eggs", "books", "balls", "shells")


@dataclass(frozen=True)
class Problem:
    """One problem: `prompt` is what the model sees, `solution` what it should write after it."""

    prompt: str
    solution: str
    answer: str


def split_of_prompt(prompt: str) -> Split:
    """`test` iff crc32(prompt) % 10 == 0, else `train`; stable across runs and machines."""
    return "test" if zlib.crc32(prompt.encode("utf-8")) % TEST_MODULUS == 0 else "train"


def make_problem(question: str, steps: list[str], answer: int) -> Problem:
    """Assemble the prompt and the worked solution `step step #### answer`."""
    solution = " ".join([*steps, f"#### {answer}"])
    return Problem(prompt=f"Q: {question}\nA: ", solution=solution, answer=str(answer))


def step(a: int, op: str, b: int) -> tuple[str, int]:
    """One worked step `a op b=c` and its value (`/` only for exact division)."""
    if op == "+":
        value = a + b
    elif op == "-":
        value = a - b
    elif op == "*":
        value = a * b
    else:
        value = a // b
    return f"{a}{op}{b}={value}", value


def _fail(key: str, message: str) -> None:
    raise ValueError(f"task.{key}: {message}")


def check_int(key: str, value: object, low: int, high: int | None = None) -> None:
    """One-line ValueError unless `low <= value (<= high)` and value is an int."""
    if not isinstance(value, int) or isinstance(value, bool):
        _fail(key, f"expected an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        _fail(key, f"{value} is out of range; set it {bound}")


def check_prob(key: str, value: object) -> None:
    """One-line ValueError unless value is a probability in [0, 1]."""
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value <= 1:
        _fail(key, f"expected a probability in [0, 1], got {value!r}")


def check_order(low_key: str, low: int, high_key: str, high: int) -> None:
    """One-line ValueError unless low <= high."""
    if low > high:
        _fail(low_key, f"{low} > task.{high_key}={high}; lower it or raise task.{high_key}")


@dataclass(frozen=True)
class Task:
    """Base of the families: sampling, splits, held-out sets and per-step train batches."""

    name: ClassVar[str] = ""
    space_knob: ClassVar[str] = "max_value"

    def generate(self, rng: random.Random) -> Problem:
        """Draw one problem of either split."""
        raise NotImplementedError

    @classmethod
    def knobs(cls) -> tuple[str, ...]:
        """Names of the difficulty knobs (the dataclass fields)."""
        return tuple(f.name for f in fields(cls))

    def sample(self, rng: random.Random) -> Problem:
        """Draw one problem of either split from `rng`."""
        return self.generate(rng)

    def split_of(self, problem: Problem) -> Split:
        """The split a problem belongs to, decided by its prompt alone."""
        return split_of_prompt(problem.prompt)

    def problems(self, split: str, n: int, seed: int) -> list[Problem]:
        """`n` distinct problems of `split`, a pure function of (knobs, split, n, seed).

        Draws are sequential and filtered, so a shorter list is a prefix of a longer one. Once
        `2000 + 10 * found` draws in a row bring nothing new, the space counts as exhausted.
        """
        if split not in SPLITS:
            _fail("split", f"unknown split {split!r}; choose one of train, test")
        check_int(f"num_{split}", n, 0)
        rng = random.Random(f"{self.name}:{split}:{seed}")
        seen: set[str] = set()
        out: list[Problem] = []
        draws = stall = 0
        while len(out) < n and draws < 200 * n + 2000 and stall < 2000 + 10 * len(out):
            problem = self.generate(rng)
            draws, stall = draws + 1, stall + 1
            if problem.prompt not in seen and split_of_prompt(problem.prompt) == split:
                seen.add(problem.prompt)
                out.append(problem)
                stall = 0
        if len(out) < n:
            self._too_small(split, n, len(out), draws)
        return out

    def train_batch(self, step: int, n: int, seed: int) -> list[Problem]:
        """The `n` train problems of optimisation `step`: a pure function of (seed, step).

        Repeats inside a batch are allowed; test-split problems never appear.
        """
        rng = random.Random(seed * 1_000_003 + step)
        out: list[Problem] = []
        max_draws = 200 * n + 2000
        for _ in range(max_draws):
            if len(out) == n:
                break
            problem = self.generate(rng)
            if split_of_prompt(problem.prompt) == "train":
                out.append(problem)
        if len(out) < n:
            self._too_small("train", n, len(out), max_draws)
        return out

    def _too_small(self, split: str, n: int, found: int, draws: int) -> None:
        _fail(
            f"num_{split}",
            f"asked for {n} {split} problems of '{self.name}' but found {found} in {draws} "
            f"draws; ask for fewer or raise task.{self.space_knob}",
        )


@dataclass(frozen=True)
class Arith(Task):
    """Arithmetic expressions such as `(12+7)*3` or `5+8-4`, evaluated one operation per step.

    Knobs: `max_value` bounds operands of `+`/`-` (1..max_value); `max_factor` bounds the
    operand of `*` (2..max_factor); `min_ops`/`max_ops` set the number of operations; `ops` is
    the allowed operator set; `allow_negative` lets subtraction go below zero (otherwise the
    operands are placed so that every intermediate result stays >= 0).
    """

    name: ClassVar[str] = "arith"
    max_value: int = 20
    max_factor: int = 9
    min_ops: int = 1
    max_ops: int = 2
    ops: str = "+-*"
    allow_negative: bool = False

    def __post_init__(self) -> None:
        check_int("max_value", self.max_value, 1)
        check_int("max_factor", self.max_factor, 2)
        check_int("min_ops", self.min_ops, 1, 8)
        check_int("max_ops", self.max_ops, 1, 8)
        check_order("min_ops", self.min_ops, "max_ops", self.max_ops)
        if not isinstance(self.ops, str) or not self.ops or set(self.ops) - set("+-*"):
            _fail("ops", f"expected a non-empty string of '+', '-', '*', got {self.ops!r}")

    def generate(self, rng: random.Random) -> Problem:
        value = rng.randint(1, self.max_value)
        expr, top = str(value), ""
        steps: list[str] = []
        for _ in range(rng.randint(self.min_ops, self.max_ops)):
            op = rng.choice(self.ops)
            high, low = (self.max_factor, 2) if op == "*" else (self.max_value, 1)
            operand = rng.randint(low, high)
            left = self._operand_left(rng, op, value, operand)
            expr = self._combine(expr, top, op, operand, left)
            text, value = step(operand, op, value) if left else step(value, op, operand)
            steps.append(text)
            top = op
        return make_problem(expr, steps, value)

    def _operand_left(self, rng: random.Random, op: str, value: int, operand: int) -> bool:
        if op == "-" and not self.allow_negative:
            return value < operand
        return rng.random() < 0.5

    @staticmethod
    def _combine(expr: str, top: str, op: str, operand: int, left: bool) -> str:
        """Write the new operation so that the usual precedence gives the step order."""
        if left:
            inner = f"({expr})" if top else expr
            return f"{operand}{op}{inner}"
        needs_parens = op == "*" and top in ("+", "-")
        return f"({expr}){op}{operand}" if needs_parens else f"{expr}{op}{operand}"


@dataclass(frozen=True)
class Word(Task):
    """Templated grade-school word problems, e.g. `Tom has 3 apples and buys 5 more. ...`.

    Knobs: `max_value` bounds counts (1..max_value); `max_factor` bounds bag counts and group
    sizes in multiplication and division templates (2..max_factor); `min_steps`/`max_steps`
    (1 or 2) choose between one-step and two-step templates.
    """

    name: ClassVar[str] = "word"
    max_value: int = 20
    max_factor: int = 9
    min_steps: int = 1
    max_steps: int = 2

    def __post_init__(self) -> None:
        check_int("max_value", self.max_value, 2)
        check_int("max_factor", self.max_factor, 2)
        check_int("min_steps", self.min_steps, 1, 2)
        check_int("max_steps", self.max_steps, 1, 2)
        check_order("min_steps", self.min_steps, "max_steps", self.max_steps)

    def generate(self, rng: random.Random) -> Problem:
        num_steps = rng.randint(self.min_steps, self.max_steps)
        templates = _ONE_STEP if num_steps == 1 else _TWO_STEP
        who, other = rng.sample(_NAMES, 2)
        item = rng.choice(_ITEMS)
        return rng.choice(templates)(self, rng, who, other, item)

    def count(self, rng: random.Random, low: int = 1) -> int:
        return rng.randint(low, self.max_value)

    def factor(self, rng: random.Random) -> int:
        return rng.randint(2, self.max_factor)


def _word_add(t: Word, rng: random.Random, who: str, other: str, item: str) -> Problem:
    a, b = t.count(rng), t.count(rng)
    text, total = step(a, "+", b)
    return make_problem(f"{who} has {a} {item} and buys {b} more. How many {item}?", [text], total)


def _word_sub(t: Word, rng: random.Random, who: str, other: str, item: str) -> Problem:
    a = t.count(rng, low=2)
    b = rng.randint(1, a)
    text, left = step(a, "-", b)
    question = f"{who} has {a} {item} and gives away {b}. How many are left?"
    return make_problem(question, [text], left)


def _word_mul(t: Word, rng: random.Random, who: str, other: str, item: str) -> Problem:
    a, b = t.factor(rng), t.count(rng, low=2)
    text, total = step(a, "*", b)
    return make_problem(f"{who} buys {a} bags of {b} {item}. How many {item}?", [text], total)


def _word_div(t: Word, rng: random.Random, who: str, other: str, item: str) -> Problem:
    groups, each = t.factor(rng), t.count(rng)
    text, share = step(groups * each, "/", groups)
    question = f"{who} shares {groups * each} {item} among {groups} kids. How many each?"
    return make_problem(question, [text], share)


def _word_add_sub(t: Word, rng: random.Random, who: str, other: str, item: str) -> Problem:
    a, b = t.count(rng), t.count(rng)
    first, total = step(a, "+", b)
    c = rng.randint(1, total)
    second, left = step(total, "-", c)
    question = f"{who} has {a} {item}, buys {b} and gives away {c}. How many now?"
    return make_problem(question, [first, second], left)


def _word_mul_add(t: Word, rng: random.Random, who: str, other: str, item: str) -> Problem:
    a, b, c = t.factor(rng), t.count(rng, low=2), t.count(rng)
    first, bagged = step(a, "*", b)
    second, total = step(bagged, "+", c)
    question = f"{who} buys {a} bags of {b} {item} and {c} more. How many {item}?"
    return make_problem(question, [first, second], total)


def _word_more_than(t: Word, rng: random.Random, who: str, other: str, item: str) -> Problem:
    a, b = t.count(rng), t.count(rng)
    first, theirs = step(a, "+", b)
    second, total = step(a, "+", theirs)
    question = f"{who} has {a} {item}. {other} has {b} more. How many in all?"
    return make_problem(question, [first, second], total)


_ONE_STEP = (_word_add, _word_sub, _word_mul, _word_div)
_TWO_STEP = (_word_add_sub, _word_mul_add, _word_more_than)


def _linear_side(coef: int, const: int) -> str:
    head = "x" if coef == 1 else f"{coef}*x"
    return head if const == 0 else f"{head}{const:+d}"


def _move_const(rhs: int, const: int) -> list[str]:
    """Steps that move `const` from the x side to the right-hand side."""
    if const == 0:
        return []
    return [step(rhs, "-", const)[0] if const > 0 else step(rhs, "+", -const)[0]]


@dataclass(frozen=True)
class Linear(Task):
    """Solve `a*x+b=c` (or `a*x+b=c*x+d`) for an integer x, e.g. `19-4=15 15/3=5 #### 5`.

    Knobs: `max_coef` bounds the coefficient of x (1..max_coef); `max_x` bounds |x|;
    `max_const` bounds |b| (and |d|); `allow_negative` allows negative x and constants;
    `two_sided` is the probability of x on both sides.
    """

    name: ClassVar[str] = "linear"
    space_knob: ClassVar[str] = "max_x"
    max_coef: int = 9
    max_x: int = 10
    max_const: int = 20
    allow_negative: bool = True
    two_sided: float = 0.0

    def __post_init__(self) -> None:
        check_int("max_coef", self.max_coef, 1)
        check_int("max_x", self.max_x, 1)
        check_int("max_const", self.max_const, 0)
        check_prob("two_sided", self.two_sided)
        if self.max_coef == 1 and self.max_const == 0:
            _fail("max_const", "x=c is not a problem; with max_coef=1 set max_const >= 1")
        if self.two_sided > 0 and self.max_coef < 2:
            _fail("max_coef", "two-sided equations need max_coef >= 2; raise it or set two_sided=0")

    def _draw(self, rng: random.Random, bound: int) -> int:
        return rng.randint(-bound if self.allow_negative else 0, bound)

    def generate(self, rng: random.Random) -> Problem:
        x = self._draw(rng, self.max_x)
        b = self._draw(rng, self.max_const)
        if rng.random() < self.two_sided:
            return self._two_sided(rng, x, b)
        a = rng.randint(1, self.max_coef)
        while a == 1 and b == 0:
            b = self._draw(rng, self.max_const)
        steps = _move_const(a * x + b, b)
        if a != 1:
            steps.append(step(a * x, "/", a)[0])
        return make_problem(f"Solve for x: {_linear_side(a, b)}={a * x + b}", steps, x)

    def _two_sided(self, rng: random.Random, x: int, b: int) -> Problem:
        a = rng.randint(2, self.max_coef)
        c = rng.randint(1, a - 1)
        d = a * x + b - c * x
        coef_step, k = step(a, "-", c)
        steps = [coef_step, *_move_const(d, b)]
        if k != 1 or b == 0:
            steps.append(step(k * x, "/", k)[0])
        question = f"Solve for x: {_linear_side(a, b)}={_linear_side(c, d)}"
        return make_problem(question, steps, x)


@dataclass(frozen=True)
class Sequence(Task):
    """Continue an arithmetic or geometric sequence: `2,5,8,11,?` -> `11+3=14 #### 14`.

    Knobs: `min_length`/`max_length` bound the number of shown terms; `max_start` bounds the
    smallest term of an arithmetic sequence and `max_step` its step; `decreasing` is the
    probability an arithmetic sequence runs downwards; `geometric` is the probability of a
    geometric sequence with first term 1..max_geo_start and ratio 2..max_ratio.
    """

    name: ClassVar[str] = "sequence"
    space_knob: ClassVar[str] = "max_start"
    min_length: int = 3
    max_length: int = 5
    max_start: int = 50
    max_step: int = 12
    decreasing: float = 0.25
    geometric: float = 0.2
    max_ratio: int = 3
    max_geo_start: int = 9

    def __post_init__(self) -> None:
        check_int("min_length", self.min_length, 2, 12)
        check_int("max_length", self.max_length, 2, 12)
        check_order("min_length", self.min_length, "max_length", self.max_length)
        check_int("max_start", self.max_start, 1)
        check_int("max_step", self.max_step, 1)
        check_prob("decreasing", self.decreasing)
        check_prob("geometric", self.geometric)
        check_int("max_ratio", self.max_ratio, 2)
        check_int("max_geo_start", self.max_geo_start, 1)

    def generate(self, rng: random.Random) -> Problem:
        length = rng.randint(self.min_length, self.max_length)
        if rng.random() < self.geometric:
            start, ratio = rng.randint(1, self.max_geo_start), rng.randint(2, self.max_ratio)
            terms = [start * ratio**i for i in range(length + 1)]
            text, _ = step(terms[-2], "*", ratio)
        else:
            start, delta = rng.randint(1, self.max_start), rng.randint(1, self.max_step)
            terms = [start + delta * i for i in range(length + 1)]
            if rng.random() < self.decreasing:
                terms.reverse()
                text, _ = step(terms[-2], "-", delta)
            else:
                text, _ = step(terms[-2], "+", delta)
        shown = ",".join(str(t) for t in terms[:-1])
        return make_problem(f"Continue {shown},?", [text], terms[-1])


FAMILIES: dict[str, type[Task]] = {t.name: t for t in (Arith, Linear, Sequence, Word)}
