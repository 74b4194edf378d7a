"""The W&B logger of a run: history keyed by the training step, and one row per step across resumes.

A resumed run starts a new W&B run folder with the same run id, and `wandb sync` uploads a run's
folders one after another into one run (wandb 0.31: "files that are part of the same run are synced
sequentially in order of start time"). Two things would otherwise go wrong across a kill and a
resume:
- W&B's own step counter restarts at 0 in every folder, so the folders' rows would collide: here
  the W&B step is the training step;
- the killed start may have written steps after its last checkpoint (trained again after the
  resume, to the same values: resume is exact), or may have lost steps before it (a SIGKILLed
  W&B writer does not flush its buffer). So the new folder skips every step the earlier folders
  hold (read back from their transaction logs, `wandb_history.py`) and first re-logs, from the
  local metrics table, the checkpointed steps they lack. Re-logged rows carry the scalar metrics;
  the per-layer W&B table of those steps is not restored.
"""

from __future__ import annotations

import math
from pathlib import Path

from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from .folder import read_jsonl


class StepWandbLogger(WandbLogger):
    """`WandbLogger` logging at W&B step = training step, skipping steps up to `logged_through`
    (the highest step in this run id's earlier folders) and re-logging the missing steps of
    `table` (the run's metrics table) before the first new step."""

    def __init__(self, *args, logged_through: int = -1, table: Path | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.logged_through = logged_through
        self._table = table
        self._backfilled = False
        # Lightning always passes `anonymous`, which wandb answers with a deprecation warning
        self._wandb_init.pop("anonymous", None)

    def _backfill(self, before: float) -> None:
        """Log the table's steps in (logged_through, before) once, before any new step."""
        if self._backfilled:
            return
        self._backfilled = True
        for row in (read_jsonl(self._table) if self._table is not None else []):
            step = row.get("step")
            if isinstance(step, int) and self.logged_through < step < before:
                values = {k: v for k, v in row.items() if k != "step" and v is not None}
                self.experiment.log({**values, "trainer/global_step": step}, step=step)
                self.logged_through = step

    @rank_zero_only
    def log_metrics(self, metrics, step=None) -> None:
        if step is None:
            return super().log_metrics(metrics, step)
        self._backfill(before=step)
        if step <= self.logged_through:
            return None
        self.experiment.log({**metrics, "trainer/global_step": step}, step=step)
        return None

    @rank_zero_only
    def finalize(self, status: str) -> None:
        if status == "success":
            self._backfill(before=math.inf)  # a resumed run with no step left to train
        super().finalize(status)
