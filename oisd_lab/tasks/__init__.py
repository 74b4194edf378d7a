"""Task registry: `get_task(name, **difficulty)` builds a task family with its difficulty knobs.

A task samples `Problem`s (prompt, worked solution, answer), assigns each to the `train` or
held-out `test` split by a stable hash of its prompt, and serves deterministic held-out sets
(`problems`) and per-step train batches (`train_batch`).
"""

from __future__ import annotations

from oisd_lab.tasks.synthetic import (
    FAMILIES,
    Arith,
    Linear,
    Problem,
    Sequence,
    Task,
    Word,
    split_of_prompt,
)

TASKS: tuple[str, ...] = tuple(sorted(FAMILIES))

__all__ = [
    "TASKS",
    "Arith",
    "Linear",
    "Problem",
    "Sequence",
    "Task",
    "Word",
    "get_task",
    "split_of_prompt",
]


def get_task(name: str, **difficulty: object) -> Task:
    """Build task `name` with difficulty knobs; unknown names or knobs give a one-line error."""
    if name not in FAMILIES:
        raise ValueError(f"task.name: unknown task {name!r}; choose one of {', '.join(TASKS)}")
    family = FAMILIES[name]
    knobs = family.knobs()
    for key in difficulty:
        if key not in knobs:
            raise ValueError(
                f"task.{key}: unknown difficulty knob for {name!r}; choose from {', '.join(knobs)}"
            )
    return family(**difficulty)
