"""`math_reward`: equivalent forms score 1, near-misses 0, hostile input is harmless and bounded,
and grading works off the main thread and in worker processes."""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import threading
import time

import pytest

from oisd_lab import rewards
from oisd_lab.rewards import math_reward

EQUIVALENT = [
    (r"so the answer is \boxed{\frac{1}{2}}", "0.5"),
    (r"\boxed{0.5}", r"\frac{1}{2}"),
    (r"\boxed{\dfrac{3}{4}}", r"\frac34"),
    (r"$\frac{1}{2}$", "1/2"),
    ("The farm sells 1,000 eggs.", "1000"),
    (r"\boxed{1000}", "1,000"),
    ("3*4=12, 12-2=10\n#### 10", "10"),
    ("#### 72", "72"),
    ("Total: 72 dollars #### 72\nQuestion: next one 5", "72"),
    (r"\boxed{5}", "#### 5"),
    ("$x=3$", "3"),
    (r"\boxed{x = 3}", "3"),
    ("The answer is $3$.", "3"),
    (r"Final answer: \boxed{27}", "27.0"),
    (r"\boxed{\sqrt{2}}", r"\sqrt{2}"),
    (r"\boxed{(1,1)}", "(1,1)"),
    (r"\boxed{90^\circ}", "90"),
    (r"\boxed{C}", "C"),
    (r"\boxed{-7}", "-7"),
    ("First 5 apples, then 7 more, so 12", "12"),
    (r"First \boxed{1}, corrected: \boxed{2}", "2"),  # the last box counts
]

NEAR_MISSES = [
    (r"\boxed{3}", "4"),
    (r"\boxed{0.51}", "0.5"),
    (r"\boxed{\frac{1}{3}}", "0.33"),
    ("#### 73", "72"),
    ("#### 7", "-7"),
    (r"\boxed{(1,2)}", "(2,1)"),
    (r"\boxed{D}", "C"),
    ("First 5 apples, then 7 more, so 12", "5"),
    (r"First \boxed{1}, corrected: \boxed{2}", "1"),
    ("no answer at all", "3"),
    ("", "3"),
    ("3", ""),
]


@pytest.mark.parametrize(("completion", "answer"), EQUIVALENT)
def test_equivalent_forms_score_one(completion, answer):
    assert math_reward(completion, answer) == 1.0


@pytest.mark.parametrize(("completion", "answer"), NEAR_MISSES)
def test_near_misses_score_zero(completion, answer):
    assert math_reward(completion, answer) == 0.0


HOSTILE = [
    "1+" * 200_000 + "1",  # huge: only the tail is read
    "\\boxed{" * 5000 + "1" + "}" * 5000,  # deeply nested braces
    "{" * 10_000,
    "$" + "\\frac{1}{" * 400 + "2" + "}" * 400 + "$",
    "__import__('os').getpid() #### exec('2')",
    bytes(range(256)),
    "\x00\x01\x02 #### \x00",
    "\ud800 lone surrogate #### 3",
    r"\boxed{9^{9^{9^{9^{9}}}}}",  # a tower sympy would never finish
    r"\boxed{100000000!}",
    None,
    12,
    ["#### 3"],
]


@pytest.mark.parametrize("completion", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_input_is_harmless_and_bounded(completion):
    start = time.perf_counter()
    score = math_reward(completion, "3")
    assert score in (0.0, 1.0)
    assert time.perf_counter() - start < 4 * rewards.GRADE_TIMEOUT_S + 1


def test_hostile_reference_is_harmless():
    assert math_reward("#### 3", "\\boxed{" * 5000) == 0.0
    assert math_reward("#### 3", r"\boxed{9^{9^{9^{9}}}}") == 0.0
    assert math_reward("#### 3", b"3") == 1.0


def test_model_text_is_never_executed(tmp_path):
    marker = tmp_path / "executed"
    payloads = [
        f"__import__('os').system('touch {marker}')",
        f"\\boxed{{__import__('pathlib').Path('{marker}').touch()}}",
        f"#### open('{marker}', 'w')",
        f"$exec(\"open('{marker}','w')\")$ so 3",
    ]
    for text in payloads:
        assert math_reward(text, "3") in (0.0, 1.0)
    assert not marker.exists()


def _grade_in_thread(pairs):
    out = {}

    def work():
        out["scores"] = [math_reward(c, a) for c, a in pairs]

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(timeout=120)
    return out.get("scores")


def test_grading_from_a_thread_matches_the_main_thread():
    pairs = EQUIVALENT[:6] + NEAR_MISSES[:4]
    assert _grade_in_thread(pairs) == [math_reward(c, a) for c, a in pairs]


def test_thread_grading_kills_a_stuck_grader(monkeypatch):
    monkeypatch.setattr(rewards, "GUARD_TIMEOUT_S", 0.5)  # the child's alarm (2 s) would be too late
    start = time.perf_counter()
    assert _grade_in_thread([(r"\boxed{9^{9^{9^{9^{9}}}}}", "3")]) == [0.0]
    assert time.perf_counter() - start < 1.5
    assert _grade_in_thread([("#### 3", "3")]) == [1.0]  # a fresh grader takes over


def test_grading_in_worker_processes():
    pairs = EQUIVALENT[:4] + NEAR_MISSES[:4] + [(r"\boxed{9^{9^{9^{9}}}}", "3")]
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        scores = list(pool.map(math_reward, *zip(*pairs, strict=True), timeout=120))
    assert scores == [1.0] * 4 + [0.0] * 5


def test_many_calls_are_fast():
    start = time.perf_counter()
    for i in range(200):
        math_reward(f"step one, step two, so the answer is \\boxed{{{i}}}", str(i))
    assert time.perf_counter() - start < 10
