"""Shared fixtures: offline, one torch thread per worker, a seeded tiny model, a shared cache."""

from __future__ import annotations

import os
import socket

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


def free_port() -> int:
    """A TCP port nothing listens on now, for the rendezvous of ranks a test starts: a fixed port
    collides when pytest-xdist runs a module's ranks-starting fixture on two workers at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tiny_overrides(run_dir, *extra: str) -> list[str]:
    """A run that finishes in seconds (experiments/debug/quick.yaml), in `run_dir`."""
    return [f"run_dir={run_dir}", "debug=quick", *extra]


def assert_gradients_flowed(rows: list[dict]) -> None:
    """The metrics rows of a training run in which the policy gradient existed: some group's
    rewards differed (non-zero advantages) and some step's gradient norm was positive."""
    assert any(r["frac_reward_zero_std"] < 1 for r in rows), "every group's rewards were equal: no policy gradient"
    assert any((r.get("grad_norm") or 0) > 0 for r in rows), "no step had a non-zero gradient"


def assert_alignment_in_view(rows: list[dict]) -> None:
    """The metrics rows of an OISD run whose logging steps' gradient view shows both alignment
    terms reaching the weights (a non-zero gradient of the logit and the attention channel)."""
    for term in ("think", "attn"):
        assert any((r.get(f"grad/{term}/norm") or 0) > 0 for r in rows), f"no grad/{term}/norm > 0 in the view"


@pytest.fixture(autouse=True)
def _own_wandb_service():
    """Training subprocesses start their own W&B service: one inherited from a test that ran W&B
    in this worker would keep a killed run's id "in use" and fail the resumed start."""
    os.environ.pop("WANDB_SERVICE", None)
    yield


def fit_rows(module, steps: int) -> list[dict]:
    """Train `module` for `steps` with a plain Lightning Trainer on CPU; the logged rows, each with
    its step."""
    import lightning as L
    from lightning.pytorch.loggers import Logger

    class Rows(Logger):
        name, version = "rows", 0

        def __init__(self):
            super().__init__()
            self.rows = []

        def log_hyperparams(self, *args, **kwargs):
            pass

        def log_metrics(self, metrics, step=None):
            self.rows.append({"step": step, **metrics})

    rows = Rows()
    trainer = L.Trainer(max_steps=steps, logger=[rows], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", num_sanity_val_steps=0)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(list(range(steps)), batch_size=None))
    return rows.rows
