"""The run folder and the grid folder on disk: the name of every file, how `status.json` is
written, and the readers. Torch-free, so the grid runner and the analysis read runs without it.

A run folder (`RunDir`)::

    config.yaml         the resolved config (a later run in the same folder must match it)
    env.json            versions, hardware and git commit
    status.json         running / failed / interrupted / finished, run id, times, error
    metrics.jsonl       one row per step (the local metrics table)
    completions.jsonl   every completion of each logging step
    diagnostics.jsonl   per-layer metrics of each logging step (every layer and split)
    snapshots/          step_XXXXXX.json: a few rollouts' per-layer detail, for notebooks
    checkpoints/        Lightning checkpoints (the same run_dir resumes from the newest sound one)
    final_model/        the trained policy and tokenizer (save_pretrained)
    eval.json           held-out results before and after RL
    eval_cli.json       `oisd-lab eval` of this folder
    plan.json           the memory plan (`log.plan=true`) and memory.json, the measured peaks beside it
    wandb/              the W&B run (offline by default)
    log.txt, cell.json  grid cells only: the run's output, and the cell and its command

A grid folder holds `grid.json` (the expanded grid) and one run folder per cell in
`cells/<cell id>/`.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

GRID_MANIFEST = "grid.json"
CELLS = "cells"


@dataclass
class RunDir:
    """Every path a run writes."""

    root: Path

    def __post_init__(self) -> None:
        self.root = Path(self.root)

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def env(self) -> Path:
        return self.root / "env.json"

    @property
    def status(self) -> Path:
        return self.root / "status.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def completions(self) -> Path:
        return self.root / "completions.jsonl"

    @property
    def diagnostics(self) -> Path:
        return self.root / "diagnostics.jsonl"

    @property
    def step_logs(self) -> tuple[Path, ...]:
        """Logs with rows of logging steps that a resumed run writes again (metrics.jsonl is
        trimmed by its own logger)."""
        return (self.completions, self.diagnostics)

    @property
    def plan(self) -> Path:
        return self.root / "plan.json"

    @property
    def memory(self) -> Path:
        return self.memory_of(0)

    def memory_of(self, rank: int) -> Path:
        """The measured peaks of one rank: memory.json (rank 0), memory.rank<r>.json (the others)."""
        return self.root / ("memory.json" if rank == 0 else f"memory.rank{rank}.json")

    @property
    def snapshots(self) -> Path:
        return self.root / "snapshots"

    def snapshot(self, step: int) -> Path:
        return self.snapshots / f"step_{step:06d}.json"

    def snapshot_steps(self) -> list[int]:
        return sorted(int(p.stem.split("_")[1]) for p in self.snapshots.glob("step_*.json"))

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def final_model(self) -> Path:
        return self.root / "final_model"

    @property
    def eval(self) -> Path:
        return self.root / "eval.json"

    @property
    def eval_cli(self) -> Path:
        return self.root / "eval_cli.json"

    @property
    def wandb(self) -> Path:
        return self.root / "wandb"

    @property
    def log(self) -> Path:
        return self.root / "log.txt"

    @property
    def cell_info(self) -> Path:
        return self.root / "cell.json"

    @property
    def lock(self) -> Path:
        """Held by the grid runner that runs this cell."""
        return self.root / ".grid.lock"

    def read_status(self) -> dict:
        return read_json(self.status)

    def write_status(self, **fields) -> None:
        """Merge `fields` into status.json (a field given as None is removed), atomically."""
        data = {**self.read_status(), **fields, "updated": time.time()}
        data = {k: v for k, v in data.items() if v is not None}
        tmp = self.status.with_name(f"{self.status.name}.tmp{os.getpid()}")  # runner and run may both write
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, self.status)


def default_run_dir(task: str, method: str, seed: int) -> Path:
    """`runs/<task>-<method>-s<seed>-<date>-<time>`."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{task}-{method}-s{seed}-{stamp}"


def cell_folder(grid_dir: Path, cell_id: str) -> Path:
    """The run folder of a grid cell."""
    return Path(grid_dir) / CELLS / cell_id


def cell_folders(grid_dir: Path) -> list[Path]:
    """The cell folders of a grid folder that hold a run (a config.yaml), sorted by name."""
    return sorted(p for p in (Path(grid_dir) / CELLS).glob("*") if RunDir(p).config.is_file())


def read_json(path: Path) -> dict:
    """A JSON file's object; {} when it is missing or unreadable (a run that has not written it)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSON-lines file ([] when missing); a torn last line (a killed writer) is skipped."""
    rows = []
    if Path(path).is_file():
        for line in Path(path).read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows
