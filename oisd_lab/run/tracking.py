"""Run tracking: the local metrics table, Weights & Biases (offline by default; opened and closed
here), environment info."""

from __future__ import annotations

import math
import os
import platform
import socket
import sys
import threading
from pathlib import Path
from urllib.parse import urlparse

from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only

from ..config import to_dict
from ..files import append_jsonl, truncate_jsonl
from ..provenance import git_commit
from .folder import RunDir
from .wandb_history import last_logged_step
from .wandb_logger import StepWandbLogger


class TableLogger(Logger):
    """Appends one JSON row per logged step to `metrics.jsonl` (the local metrics table).

    On resume from a checkpoint at step S, rows with step > S are dropped first: those steps are
    trained again, so the table holds every step exactly once.
    """

    def __init__(self, path: Path, resume_step: int = 0):
        super().__init__()
        self.path = Path(path)
        if resume_step:
            truncate_jsonl(self.path, resume_step)
        elif not resume_step and self.path.exists():
            self.path.unlink()

    @property
    def name(self) -> str:
        return "table"

    @property
    def version(self) -> str:
        return "0"

    @rank_zero_only
    def log_hyperparams(self, params, *args, **kwargs) -> None:
        return None

    @rank_zero_only
    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        append_jsonl(self.path, [{"step": step, **{k: _plain(v) for k, v in metrics.items()}}])


def _plain(value):
    value = value.item() if hasattr(value, "item") else value
    if isinstance(value, float) and not math.isfinite(value):
        return None  # strict JSON has no NaN/Inf; a skipped step's NaN loss is recorded as null
    return value


def wandb_env(root: Path) -> None:
    """Keep every file wandb writes inside the run directory."""
    base = RunDir(root).wandb
    for var, sub in (("WANDB_DIR", ""), ("WANDB_CACHE_DIR", ".cache"), ("WANDB_DATA_DIR", ".data"),
                     ("WANDB_CONFIG_DIR", ".config")):
        path = base / sub if sub else root
        path.mkdir(parents=True, exist_ok=True)
        os.environ[var] = str(path)
    os.environ.setdefault("WANDB_SILENT", "true")


def resolve_wandb_mode(mode: str, log=print) -> str:
    """`online` without credentials falls back to `offline`, and says how to sync later."""
    if mode != "online":
        return mode
    try:
        import wandb

        if wandb.api.api_key:
            return "online"
    except Exception:
        pass
    log("W&B: not logged in; logging offline (upload later with `wandb sync <run_dir>/wandb/offline-run-*`)")
    return "offline"


WANDB_INIT_TIMEOUT = 30.0
"""Seconds an online W&B start may take before the run falls back to offline logging."""


def wandb_reachable(timeout: float = 3.0) -> bool:
    """Whether the W&B server ($WANDB_BASE_URL) accepts a TCP connection within `timeout` seconds
    (name lookup included, which a socket timeout alone does not bound)."""
    url = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")
    port = url.port or (443 if url.scheme == "https" else 80)
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((url.hostname or "", port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    return bool(result and result[0])


def make_wandb_logger(cfg, root: Path, run_id: str, log=print, table: Path | None = None):
    """A Lightning WandbLogger writing under `root/wandb`, or None when W&B is disabled; `table`
    (the run's metrics table) restores steps that an earlier, killed start did not leave in W&B
    (see `wandb_logger.py`).

    `online` falls back to offline (and says how to upload later) when there are no credentials,
    the server does not answer, or the online start fails or exceeds WANDB_INIT_TIMEOUT."""
    mode = resolve_wandb_mode(cfg.log.wandb_mode, log)
    if mode == "disabled":
        return None
    wandb_env(root)
    sync = f"upload later with `wandb sync {root}/wandb/offline-run-*`"
    if mode == "online" and not wandb_reachable():
        log(f"W&B: server {os.environ.get('WANDB_BASE_URL') or 'api.wandb.ai'} not reachable; logging offline ({sync})")
        mode = "offline"
    logger = _wandb_logger(cfg, root, run_id, mode, table)
    if mode == "online":
        try:
            logger.experiment  # noqa: B018 - start the run now, where a failure can still fall back
        except Exception as err:
            log(f"W&B: online start failed ({type(err).__name__}: {str(err).splitlines()[0][:120]}); "
                f"logging offline ({sync})")
            logger = _wandb_logger(cfg, root, run_id, "offline", table)
    return logger


def _wandb_logger(cfg, root: Path, run_id: str, mode: str, table: Path | None = None):
    import wandb

    tags = [f"method:{cfg.method.name}", f"task:{cfg.task.name}", f"model:{cfg.model.name}",
            f"seed:{cfg.seed}", *cfg.log.tags]
    return StepWandbLogger(project=cfg.log.wandb_project, name=root.name, save_dir=str(root), id=run_id,
                           group=cfg.log.wandb_group, tags=tags, mode=mode, resume="allow",
                           config=to_dict(cfg), log_model=False,
                           settings=wandb.Settings(init_timeout=WANDB_INIT_TIMEOUT),
                           logged_through=last_logged_step(RunDir(root).wandb, run_id), table=table)


def close_loggers(loggers: list, before: dict, after: dict) -> None:
    """Held-out results into the W&B run summary, then every logger closed."""
    for lg in loggers:
        if hasattr(lg, "experiment") and hasattr(lg.experiment, "summary"):
            for when, res in (("before", before), ("after", after)):
                for k, v in res.items():
                    if isinstance(v, (int, float)):
                        lg.experiment.summary[f"eval/{when}/{k}"] = v
        lg.finalize("success")
    finish_wandb()


def finish_wandb() -> None:
    """Close this run's W&B run, so that a later `train()` in the same process starts its own."""
    if "wandb" in sys.modules and sys.modules["wandb"].run is not None:
        sys.modules["wandb"].finish()


def environment_info() -> dict:
    import lightning
    import torch
    import transformers
    import wandb

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "lightning": lightning.__version__,
        "wandb": wandb.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        **git_commit(),
    }
