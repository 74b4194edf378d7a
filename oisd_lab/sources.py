"""Where problems come from: one interface over the synthetic families and real datasets.

A `TaskSource` hands out training problems as a pure function of (step, seed), a fixed held-out
set, the reward for a completion, and the prompt text (plain, or in the tokenizer's chat template).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .config import TaskConfig
from .errors import ConfigError
from .rewards import exact_match_reward, math_reward
from .tasks import TASKS, Problem, get_task
from .tasks.datasets import DATASETS, DatasetTask, load_dataset_task

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


class DatasetSource(TaskSource):
    """A real dataset: graded by math-verify, prompted with the dataset's plain or chat template."""

    task: DatasetTask

    def reward(self, completion: str, answer: str) -> float:
        return math_reward(completion, answer)

    def format_prompt(self, prompt: str, tokenizer=None, chat: bool = False) -> str:  # type: ignore[override]
        spec = self.task.spec
        if not chat or tokenizer is None or not getattr(tokenizer, "chat_template", None):
            return spec.plain_template.format(question=prompt)
        messages = [{"role": "user", "content": spec.chat_template.format(question=prompt)}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def load_source(cfg: TaskConfig) -> TaskSource:
    """The problem source for `task.name` (and `task.path` for local dataset files)."""
    if cfg.name in DATASETS or cfg.name == "local" or (cfg.path and cfg.name not in TASKS):
        task = load_dataset_task(cfg.name, cfg.path, cfg.train_data, cfg.test_fraction)
        return DatasetSource(cfg.name, task)
    if cfg.name in TASKS:
        try:
            task = get_task(cfg.name, **cfg.difficulty)
        except ValueError as err:
            raise ConfigError(str(err)) from err
        source = TaskSource(cfg.name, task)
        source.test_problems(cfg.num_test)  # a too-small problem space fails before training
        return source
    choices = ", ".join([*TASKS, *DATASETS])
    raise ConfigError(f"task.name: unknown task '{cfg.name}'; choose one of {choices}, "
                      "or a local file: task.path=/path/to/file.jsonl")
