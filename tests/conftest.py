"""Shared fixtures: offline, one torch thread per worker, a seeded tiny model, a shared cache."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One warm-start/eval cache for the whole session (per xdist worker)."""
    path = tmp_path_factory.mktemp("oisd_cache")
    os.environ["OISD_LAB_CACHE"] = str(path)
    return path


@pytest.fixture()
def char_tokenizer():
    from oisd_lab.models import build_char_tokenizer

    return build_char_tokenizer()


@pytest.fixture()
def tiny_model(char_tokenizer):
    from oisd_lab.models import build_tiny_model

    return build_tiny_model("tiny", vocab_size=len(char_tokenizer), seed=0)


def tiny_overrides(run_dir, *extra: str) -> list[str]:
    """A run that finishes in seconds: few warm-start and RL steps, small batches, W&B offline."""
    return [
        f"run_dir={run_dir}",
        "pretrain.steps=30",
        "pretrain.batch_size=16",
        "max_steps=3",
        "checkpoint_every=2",
        "grpo.prompts_per_step=4",
        "grpo.num_generations=4",
        "grpo.micro_batch_size=8",
        "grpo.max_completion_length=12",
        "task.num_test=16",
        "eval.k=2",
        "log.every_n_steps=2",
        "log.progress_bar=false",
        *extra,
    ]
