"""Answer extraction, number normalisation and the exact-match reward, hostile inputs included."""

from __future__ import annotations

import builtins
import random
import time

import pytest

from oisd_lab.rewards import exact_match_reward, extract_answer, normalize_number


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("3+4=7 #### 7", "7"),
        ("#### 1 then #### 2", "2"),
        ("####   42  \nmore text", "42"),
        ("#### -5", "-5"),
        ("####\n12", "12"),
        ("no marker 12", None),
        ("", None),
        ("####", None),
        ("#### ", None),
        ("#### \n", None),
        ("#### " + "9" * 100, "9" * 64),
        (None, None),
        (12, None),
    ],
)
def test_extract_answer(text: object, expected: str | None) -> None:
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("5", "5"),
        ("+5", "5"),
        ("-5", "-5"),
        ("007", "7"),
        ("5.0", "5"),
        ("5.", "5"),
        ("5.50", "5.5"),
        (".5", "0.5"),
        ("-0", "0"),
        ("-0.0", "0"),
        (" 7 ", "7"),
        ("1,000", "1000"),
        ("-1,234.50", "-1234.5"),
        ("1,00", None),
        ("1,2", None),
        ("", None),
        ("abc", None),
        ("1e5", None),
        ("nan", None),
        ("Infinity", None),
        ("--5", None),
        ("5 apples", None),
        ("\u0663", None),
        ("1" * 65, None),
        (None, None),
    ],
)
def test_normalize_number(text: object, expected: str | None) -> None:
    assert normalize_number(text) == expected


@pytest.mark.parametrize(
    ("completion", "answer", "reward"),
    [
        ("19-4=15 15/3=5 #### 5", "5", 1.0),
        ("#### 35.0", "35", 1.0),
        ("#### 1,000", "1000", 1.0),
        ("#### -3", "-3", 1.0),
        ("#### +3", "3", 1.0),
        ("#### 36", "35", 0.0),
        ("#### 35 #### 36", "35", 0.0),
        ("35", "35", 0.0),
        ("#### 3", "-3", 0.0),
        ("#### 1+1", "2", 0.0),
        ("#### 35", 35, 1.0),
        ("#### yes", "yes", 1.0),
        ("#### no", "yes", 0.0),
        ("#### ", "", 0.0),
        ("#### 5", None, 0.0),
        ("#### 5", "", 0.0),
    ],
)
def test_exact_match_reward(completion: str, answer: object, reward: float) -> None:
    assert exact_match_reward(completion, answer) == reward


HOSTILE = [
    "",
    "####",
    "#### ",
    "\x00\xff",
    "#### \x00\xff",
    "x" * 100_000,
    "#" * 100_000,
    "#### " + "9" * 100_000,
    "#### __import__('os')",
    "#### __import__('os').system('false')",
    "#### 10**1000",
    "#### 9" * 20_000,
    "#### 1e999999999",
    "#### NaN",
    "#### \u0665",
    None,
    b"\xff\xfe\x00",
    3.5,
    ["#### 5"],
]


@pytest.mark.parametrize("completion", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_completions_score_zero(completion: object) -> None:
    start = time.perf_counter()
    reward = exact_match_reward(completion, "5")
    assert reward == 0.0 and type(reward) is float
    assert time.perf_counter() - start < 0.1


def test_model_text_is_never_evaluated(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("model text was evaluated")

    monkeypatch.setattr(builtins, "eval", refuse)
    monkeypatch.setattr(builtins, "exec", refuse)
    assert exact_match_reward("#### 2*3", "6") == 0.0
    assert exact_match_reward("#### 6", "2*3") == 0.0
    assert exact_match_reward("#### 6", "6") == 1.0


def test_random_garbage_never_raises() -> None:
    rng = random.Random(0)
    for _ in range(300):
        raw = bytes(rng.randrange(256) for _ in range(rng.randrange(40)))
        text = raw.decode("latin-1")
        for completion in (text, "#### " + text, text + "####" + text):
            assert exact_match_reward(completion, text) in (0.0, 1.0)
            assert exact_match_reward(completion, "7") in (0.0, 1.0)
