"""Load run directories, grid directories and collected results tables into pandas frames.

The files of run and grid directories are named in `oisd_lab.run.folder`. `oisd-lab
collect` adds the `results`, `aggregate` and `paired` tables (parquet and CSV) to the grid folder or
to `--out`.
Everything here only reads: nothing in training imports this package.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml

from ..collect import POWER_COLUMNS, annotate
from ..grid import compact
from ..run.folder import GRID_MANIFEST, RunDir, cell_folders, read_json
from ..run.folder import read_jsonl as _read_rows
from .tables import row_label

RUN_KEYS = ("run_id", "cell", "method", "task", "seed")
COLLECTED = ("results", "aggregate", "paired")


def read_jsonl(path: Path) -> pd.DataFrame:
    """Rows of a JSON-lines file as a frame; a torn last line (a killed writer) is skipped."""
    return pd.DataFrame(_read_rows(path))


LEGACY_METRICS = {"share": "norm_ratio", "share_reach": "norm_ratio_reach"}
"""Old last part of a `grad/<term>/...` metric -> its name now, the same quantity: the gradient
view logged |g_term| / |g_policy| as `share` before it was named for what it is, a norm ratio."""


def current_metric_names(metrics: pd.DataFrame) -> pd.DataFrame:
    """A metrics frame with `grad/<term>/share` read as `grad/<term>/norm_ratio` (and `share_reach`
    as `norm_ratio_reach`). Where a frame has both, the new column keeps its values and takes the
    old one's where it has none."""
    renames = {}
    for column in metrics.columns:
        parts = str(column).split("/")
        if len(parts) == 3 and parts[0] == "grad" and parts[2] in LEGACY_METRICS:
            renames[column] = f"grad/{parts[1]}/{LEGACY_METRICS[parts[2]]}"
    if not renames:
        return metrics
    out = metrics.copy()
    for old, new in renames.items():
        out[new] = out[new].fillna(out[old]) if new in out else out[old]
    return out.drop(columns=list(renames))


@dataclass
class RunData:
    """One run directory as frames: `metrics` (one row per step), `diagnostics` (one row per
    step x layer x split), `eval` (the flat held-out result) and the snapshot steps on disk."""

    root: Path
    config: dict
    eval: dict
    metrics: pd.DataFrame
    diagnostics: pd.DataFrame
    snapshot_steps: list[int] = field(default_factory=list)

    @property
    def info(self) -> dict:
        """method, task, seed and run id, from eval.json when finished, else from the config."""
        status = RunDir(self.root).read_status()
        return {"run_id": status.get("run_id", self.root.name),
                "method": self.eval.get("method", self.config.get("method", {}).get("name")),
                "task": self.eval.get("task", self.config.get("task", {}).get("name")),
                "seed": self.eval.get("seed", self.config.get("seed"))}

    def snapshot(self, step: int | None = None) -> dict:
        """The snapshot at `step` (default: the last one)."""
        return load_snapshot(self.root, step)


def flat_eval(result: dict) -> dict:
    """`eval.json` flattened: after-RL metrics by name, before-RL ones with a `_before` suffix."""
    if not result:
        return {}
    out = {k: result[k] for k in ("method", "task", "seed", "steps", "train_seconds") if k in result}
    for when, suffix in (("after", ""), ("before", "_before")):
        for key, value in result.get(when, {}).items():
            if isinstance(value, (int, float)) and "@" not in key:
                out[f"{key}{suffix}"] = value
    return out


def snapshot_steps(run_dir: Path) -> list[int]:
    return RunDir(run_dir).snapshot_steps()


def load_snapshot(run_dir: Path, step: int | None = None) -> dict:
    steps = snapshot_steps(run_dir)
    if not steps:
        raise FileNotFoundError(f"{run_dir}: no snapshots (set log.snapshot_rollouts > 0)")
    step = steps[-1] if step is None else step
    return json.loads(RunDir(run_dir).snapshot(step).read_text())


def load_run(run_dir: str | Path) -> RunData:
    run = RunDir(Path(run_dir))
    if not run.config.is_file():
        raise FileNotFoundError(f"{run.root}: not a run directory (no {run.config.name})")
    return RunData(root=run.root, config=yaml.safe_load(run.config.read_text()) or {},
                   eval=read_json(run.eval), metrics=current_metric_names(read_jsonl(run.metrics)),
                   diagnostics=read_jsonl(run.diagnostics), snapshot_steps=run.snapshot_steps())


def read_table(folder: Path, name: str) -> pd.DataFrame | None:
    """`<folder>/<name>.parquet`, else `<name>.csv`, else None."""
    folder = Path(folder)
    if (folder / f"{name}.parquet").is_file():
        return pd.read_parquet(folder / f"{name}.parquet")
    if (folder / f"{name}.csv").is_file():
        return pd.read_csv(folder / f"{name}.csv")
    return None


def load_results(results_dir: str | Path) -> dict[str, pd.DataFrame | None]:
    """The collected tables of a grid: results (tidy), aggregate, paired. A paired table collected
    before it carried what each comparison can detect gets those columns here (`collect.annotate`)."""
    return with_power({name: read_table(Path(results_dir), name) for name in COLLECTED})


def with_power(tables: dict[str, pd.DataFrame | None]) -> dict[str, pd.DataFrame | None]:
    """The collected tables, the paired one given what each comparison can detect
    (`collect.annotate`) when it was collected before it carried those columns."""
    paired = tables.get("paired")
    if paired is not None and not paired.empty and not set(POWER_COLUMNS) <= set(paired.columns):
        tables = {**tables, "paired": annotate(paired, tables.get("aggregate"))}
    return tables


@dataclass
class GridData:
    """A grid directory: `runs` (one row per cell: run_id, cell, method, task, seed, the other axis
    values, `variant` = method and other axis values as one label, run_dir, finished), `metrics` /
    `diagnostics` / `eval` with those run columns prepended, and the collected
    `results` / `aggregate` / `paired` tables (None until `oisd-lab collect` has run)."""

    root: Path
    name: str
    manifest: dict
    runs: pd.DataFrame
    metrics: pd.DataFrame
    diagnostics: pd.DataFrame
    eval: pd.DataFrame
    results_dir: Path
    results: pd.DataFrame | None = None
    aggregate: pd.DataFrame | None = None
    paired: pd.DataFrame | None = None

    @property
    def collected(self) -> bool:
        return self.aggregate is not None

    @property
    def axes(self) -> list[str]:
        """Grid axes other than method, task and seed (e.g. `method.layers`)."""
        skip = {*RUN_KEYS, "variant", "run_dir", "finished"}
        return [c for c in self.runs.columns if c not in skip]

    def run_dirs(self, method: str | None = None, task: str | None = None) -> list[Path]:
        """Run folders of `method` on `task`, lowest seed first (none for a grid known only by its tables)."""
        sel = self.runs
        if "run_dir" not in sel.columns:
            return []
        if method is not None:
            sel = sel[sel["method"] == method]
        if task is not None:
            sel = sel[sel["task"] == task]
        return [Path(p) for p in sel.sort_values("seed")["run_dir"]]

    def snapshot(self, method: str, step: int | None = None, task: str | None = None) -> dict:
        """A snapshot of the lowest-seed run of `method` that has snapshots."""
        for run_dir in self.run_dirs(method, task):
            if snapshot_steps(run_dir):
                return load_snapshot(run_dir, step)
        raise FileNotFoundError(f"{self.root}: no run of method {method!r} has snapshots")


def _manifest_cells(manifest: dict) -> dict[str, dict]:
    cells = manifest.get("cells", [])
    if isinstance(cells, dict):
        return {str(k): v for k, v in cells.items()}
    return {str(c.get("id", c.get("cell"))): c for c in cells if isinstance(c, dict)}


def _axis_values(cell: dict) -> dict:
    """A cell's grid axes other than method/task/seed, in the text form `collect` gives them."""
    values = cell.get("axes") or {}
    return {k: v if isinstance(v, (int, float, str, bool)) else compact(v)
            for k, v in values.items() if k not in RUN_KEYS}


def results_location(grid_dir: Path) -> Path:
    """Where a grid's collected tables are: `<grid_dir>/results` if collected there, else the grid
    folder itself (`oisd-lab collect GRID_DIR` writes there by default)."""
    for folder in (Path(grid_dir) / "results", Path(grid_dir)):
        if any((folder / f"aggregate.{ext}").is_file() for ext in ("parquet", "csv")):
            return folder
    return Path(grid_dir)


def with_run(frame: pd.DataFrame, info: dict) -> pd.DataFrame:
    if frame.empty:
        return frame
    return pd.concat([pd.DataFrame({k: [v] * len(frame) for k, v in info.items()}), frame.reset_index(drop=True)],
                     axis=1)


def _concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    frames = [f for f in frames if not f.empty]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def load_grid(grid_dir: str | Path, results_dir: str | Path | None = None) -> GridData:
    """Every cell run of a grid, plus its collected tables from `results_dir` (default: see
    `results_location`)."""
    root = Path(grid_dir)
    manifest = read_json(root / GRID_MANIFEST)
    cells = _manifest_cells(manifest)
    runs, metrics, diags, evals = [], [], [], []
    for cell_dir in cell_folders(root):
        run = load_run(cell_dir)
        cell = cells.get(cell_dir.name, {})
        info = {**run.info, "cell": cell_dir.name, **{k: cell[k] for k in RUN_KEYS if k in cell}}
        axes = _axis_values(cell)
        info = {**{k: info[k] for k in RUN_KEYS}, **axes, "variant": row_label({"method": info["method"], **axes})}
        runs.append({**info, "run_dir": str(cell_dir), "finished": bool(run.eval)})
        metrics.append(with_run(run.metrics, info))
        diags.append(with_run(run.diagnostics, info))
        if run.eval:
            evals.append({**info, **{k: v for k, v in flat_eval(run.eval).items() if k not in info}})
    results_dir = Path(results_dir) if results_dir else results_location(root)
    return GridData(root=root, name=manifest.get("name", root.name), manifest=manifest,
                    runs=pd.DataFrame(runs), metrics=_concat(metrics), diagnostics=_concat(diags),
                    eval=pd.DataFrame(evals), results_dir=results_dir, **load_results(results_dir))
