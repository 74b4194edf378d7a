"""Where problems come from: one interface over the synthetic families and real datasets.

A `TaskSource` hands out training problems as a pure function of (step, seed), a fixed held-out
set, the reward for a completion, and the prompt text (plain, or in the tokenizer's chat template).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .config import ConfigError, TaskConfig
from .rewards import exact_match_reward
from .tasks import TASKS, Problem, get_task

TEST_SEED = 0  # every run of a task evaluates on the same held-out problems


@dataclass
class TaskSource:
    name: str
    task: Any

    def train_batch(self, step: int, n: int, seed: int) -> list[Problem]:
        return self.task.train_batch(step, n, seed)

    def test_problems(self, n: int) -> list[Problem]:
        try:
            return self.task.problems("test", n, TEST_SEED)
        except ValueError as err:
            raise ConfigError(str(err)) from err

    def reward(self, completion: str, answer: str) -> float:
        return exact_match_reward(completion, answer)

    @staticmethod
    def format_prompt(prompt: str, tokenizer=None, chat: bool = False) -> str:
        if not chat or tokenizer is None or not getattr(tokenizer, "chat_template", None):
            return prompt
        messages = [{"role": "user", "content": prompt.removeprefix("Q: ").removesuffix("\nA: ")}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def load_source(cfg: TaskConfig) -> TaskSource:
    """The problem source for `task.name` (and `task.path` for local dataset files)."""
    if cfg.name in TASKS:
        try:
            task = get_task(cfg.name, **cfg.difficulty)
        except ValueError as err:
            raise ConfigError(str(err)) from err
        source = TaskSource(cfg.name, task)
        source.test_problems(cfg.num_test)  # a too-small problem space fails before training
        return source
    raise ConfigError(f"task.name: unknown task '{cfg.name}'; choose one of {', '.join(TASKS)}")
