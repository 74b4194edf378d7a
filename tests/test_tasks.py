"""Synthetic task families: determinism, splits, correct worked steps, knobs and errors."""

from __future__ import annotations

import ast
import random
import re
import zlib
from itertools import pairwise

import pytest

from oisd_lab.rewards import exact_match_reward
from oisd_lab.tasks import TASKS, Problem, get_task

STEP = re.compile(r"(-?[0-9]+)([-+*/])(-?[0-9]+)=(-?[0-9]+)")
PRINTABLE = {chr(c) for c in range(32, 127)} | {"\n"}


def samples(name: str, n: int = 400, seed: int = 0, **knobs: object) -> list[Problem]:
    task = get_task(name, **knobs)
    rng = random.Random(seed)
    return [task.sample(rng) for _ in range(n)]


def question(problem: Problem) -> str:
    assert problem.prompt.startswith("Q: ") and problem.prompt.endswith("\nA: ")
    return problem.prompt[3:-4]


def checked_steps(problem: Problem) -> list[tuple[int, str, int, int]]:
    """Parse `a op b=c` steps, check each with Python ints and the last against the answer."""
    head, answer = problem.solution.split(" #### ") if " #### " in problem.solution else ("", "")
    assert answer == problem.answer, problem
    steps = []
    for text in head.split():
        match = STEP.fullmatch(text)
        assert match, (text, problem)
        a, op, b, c = int(match[1]), match[2], int(match[3]), int(match[4])
        if op == "/":
            assert b != 0 and a == b * c, problem
        else:
            assert {"+": a + b, "-": a - b, "*": a * b}[op] == c, problem
        steps.append((a, op, b, c))
    assert steps and steps[-1][3] == int(problem.answer), problem
    return steps


def safe_eval(expr: str, x: int | None = None) -> int:
    """Integer value of `+ - *` expressions over ints and `x`, walking the AST (no eval)."""

    def walk(node: ast.AST) -> int:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.Name) and node.id == "x" and x is not None:
            return x
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -walk(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in (ast.Add, ast.Sub, ast.Mult):
            left, right = walk(node.left), walk(node.right)
            return {ast.Add: left + right, ast.Sub: left - right, ast.Mult: left * right}[
                type(node.op)
            ]
        raise AssertionError(f"unexpected syntax in {expr!r}")

    return walk(ast.parse(expr, mode="eval"))


def numbers(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"[0-9]+", text)]


def test_registry_names() -> None:
    assert TASKS == ("arith", "linear", "sequence", "word")


@pytest.mark.parametrize("name", TASKS)
def test_deterministic_by_seed(name: str) -> None:
    task = get_task(name)
    assert task.problems("test", 40, 1) == get_task(name).problems("test", 40, 1)
    assert task.train_batch(5, 16, 7) == task.train_batch(5, 16, 7)
    assert samples(name, 50, seed=3) == samples(name, 50, seed=3)
    assert task.problems("test", 40, 1) != task.problems("test", 40, 2)
    assert task.train_batch(5, 16, 7) != task.train_batch(6, 16, 7)
    assert task.train_batch(5, 16, 7) != task.train_batch(5, 16, 8)


@pytest.mark.parametrize("name", TASKS)
def test_problems_prefix_and_distinct(name: str) -> None:
    task = get_task(name)
    longer = task.problems("test", 120, 0)
    assert task.problems("test", 60, 0) == longer[:60]
    assert len({p.prompt for p in longer}) == 120
    assert task.problems("train", 0, 0) == []


@pytest.mark.parametrize("name", TASKS)
def test_train_and_test_are_disjoint(name: str) -> None:
    task = get_task(name)
    test = task.problems("test", 200, 0)
    train = task.problems("train", 2000, 0)
    batches = [p for step in range(40) for p in task.train_batch(step, 32, 0)]
    test_prompts = {p.prompt for p in test}
    assert test_prompts.isdisjoint(p.prompt for p in train + batches)
    assert all(zlib.crc32(p.prompt.encode()) % 10 == 0 for p in test)
    assert all(zlib.crc32(p.prompt.encode()) % 10 != 0 for p in train + batches)
    assert {task.split_of(p) for p in test} == {"test"}
    assert {task.split_of(p) for p in train + batches} == {"train"}


@pytest.mark.parametrize("name", TASKS)
def test_test_fraction_is_about_a_tenth(name: str) -> None:
    task = get_task(name)
    splits = [task.split_of(p) for p in samples(name, 2000)]
    assert 0.05 < splits.count("test") / len(splits) < 0.15


@pytest.mark.parametrize("name", TASKS)
def test_solution_is_graded_correct_and_perturbation_wrong(name: str) -> None:
    for problem in samples(name, 300):
        assert exact_match_reward(problem.solution, problem.answer) == 1.0
        assert exact_match_reward(problem.solution, str(int(problem.answer) + 1)) == 0.0
        assert exact_match_reward(problem.solution[:-1] + "x", problem.answer) == 0.0


@pytest.mark.parametrize("name", TASKS)
def test_worked_steps_are_correct(name: str) -> None:
    for problem in samples(name, 400):
        checked_steps(problem)


@pytest.mark.parametrize("name", TASKS)
def test_default_sizes_and_charset(name: str) -> None:
    problems = samples(name, 1000)
    assert max(len(p.prompt) for p in problems) <= 70
    assert max(len(p.solution) for p in problems) <= 40
    assert all(set(p.prompt + p.solution) <= PRINTABLE for p in problems)
    answers = sorted(abs(int(p.answer)) for p in problems)
    assert answers[len(answers) // 2] < 100 and answers[int(0.95 * len(answers))] < 1000


def test_arith_answer_is_value_of_expression() -> None:
    for problem in samples("arith", 400, min_ops=1, max_ops=4):
        expr = question(problem)
        assert safe_eval(expr) == int(problem.answer), problem
        assert len(checked_steps(problem)) == sum(expr.count(op) for op in "+-*"), problem


def test_linear_answer_solves_equation() -> None:
    for problem in samples("linear", 400, two_sided=0.5):
        lhs, rhs = question(problem).removeprefix("Solve for x: ").split("=")
        x = int(problem.answer)
        checked_steps(problem)
        assert safe_eval(lhs, x) == safe_eval(rhs, x), problem
        assert safe_eval(lhs, x + 1) != safe_eval(rhs, x + 1), problem


def test_sequence_answer_continues_sequence() -> None:
    kinds = set()
    for problem in samples("sequence", 400):
        terms = [*map(int, question(problem).removeprefix("Continue ")[:-2].split(",")), 0]
        terms[-1] = int(problem.answer)
        diffs = {b - a for a, b in pairwise(terms)}
        ratios = {b / a for a, b in pairwise(terms)}
        assert len(diffs) == 1 or len(ratios) == 1, problem
        kinds.add("arith" if len(diffs) == 1 else "geo")
    assert kinds == {"arith", "geo"}


def test_arith_knobs_change_range() -> None:
    small = samples("arith", 300, max_value=5, max_factor=3)
    assert max(n for p in small for n in numbers(question(p))) <= 5
    large = samples("arith", 300, max_value=500)
    assert max(n for p in large for n in numbers(question(p))) > 100
    three = samples("arith", 100, min_ops=3, max_ops=3, ops="+-")
    assert all(len(checked_steps(p)) == 3 and "*" not in p.prompt for p in three)
    assert all(int(p.answer) >= 0 for p in samples("arith", 300, ops="-"))
    negative = samples("arith", 300, ops="-*", max_ops=3, allow_negative=True)
    assert any(int(p.answer) < 0 for p in negative)
    assert all(safe_eval(question(p)) == int(p.answer) and checked_steps(p) for p in negative)


def test_word_knobs_change_range() -> None:
    small = samples("word", 300, max_value=4, max_factor=2)
    assert max(n for p in small for n in numbers(question(p))) <= 8
    assert max(int(p.answer) for p in samples("word", 300, max_value=200)) > 200
    assert all(len(checked_steps(p)) == 2 for p in samples("word", 100, min_steps=2))
    assert all(len(checked_steps(p)) == 1 for p in samples("word", 100, max_steps=1))


def test_linear_knobs_change_range() -> None:
    assert max(abs(int(p.answer)) for p in samples("linear", 300, max_x=3)) <= 3
    assert max(abs(int(p.answer)) for p in samples("linear", 300, max_x=50)) > 10
    assert min(int(p.answer) for p in samples("linear")) < 0
    assert min(int(p.answer) for p in samples("linear", allow_negative=False)) >= 0
    assert all("*x=" not in p.prompt for p in samples("linear", 50, max_coef=1))


def test_sequence_knobs_change_range() -> None:
    geometric = samples("sequence", 100, geometric=1.0)
    assert all("*" in p.solution for p in geometric)
    rising = samples("sequence", 100, geometric=0.0, decreasing=0.0)
    assert all("+" in p.solution for p in rising)
    falling = samples("sequence", 100, geometric=0.0, decreasing=1.0)
    assert all("-" in p.solution for p in falling)
    long = samples("sequence", 100, min_length=6, max_length=6)
    assert all(question(p).count(",") == 6 for p in long)
    small = samples("sequence", 300, geometric=0.0, max_start=5, max_step=2)
    assert max(int(p.answer) for p in small) <= 17


def _error(name: str, **knobs: object) -> str:
    with pytest.raises(ValueError) as info:
        get_task(name, **knobs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_unknown_task_and_knob_errors_are_one_line() -> None:
    message = _error("foo")
    assert message.startswith("task.name: unknown task 'foo'")
    assert "arith, linear, sequence, word" in message
    message = _error("arith", bogus=1)
    assert message.startswith("task.bogus:") and "max_value" in message


@pytest.mark.parametrize(
    ("name", "knobs", "field"),
    [
        ("arith", {"min_ops": 3, "max_ops": 2}, "task.min_ops"),
        ("arith", {"ops": "/"}, "task.ops"),
        ("arith", {"max_value": 0}, "task.max_value"),
        ("word", {"max_steps": 3}, "task.max_steps"),
        ("linear", {"two_sided": 1.5}, "task.two_sided"),
        ("linear", {"max_x": "10"}, "task.max_x"),
        ("linear", {"max_coef": 1, "max_const": 0}, "task.max_const"),
        ("sequence", {"min_length": 6, "max_length": 4}, "task.min_length"),
    ],
)
def test_bad_knob_values_name_the_field(name: str, knobs: dict, field: str) -> None:
    assert _error(name, **knobs).startswith(f"{field}:")


def test_too_small_space_and_bad_split_raise_clearly() -> None:
    task = get_task("arith", max_value=2, max_ops=1, ops="+")
    with pytest.raises(ValueError, match=r"^task\.num_test: .*task\.max_value") as info:
        task.problems("test", 5, 0)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=r"^task\.split: "):
        task.problems("valid", 5, 0)


def test_exhausted_space_stops_soon_after_the_last_new_problem() -> None:
    # 6 + 6 operands -> at most 36 sums; without the stall rule a million asked would mean 2e8 draws
    task = get_task("arith", max_value=6, max_ops=1, ops="+")
    with pytest.raises(ValueError, match=r"^task\.num_test: ") as info:
        task.problems("test", 10**6, 0)
    found, draws = (int(x) for x in re.search(r"found (\d+) in (\d+) draws", str(info.value)).groups())
    assert 0 < found <= 36
    assert draws <= 2000 + 10 * found + 200 * 36  # the stall window after the last find, plus the finds
    # a reachable request is unaffected: every distinct test problem of this space is still found
    assert len(task.problems("test", found, 0)) == found
