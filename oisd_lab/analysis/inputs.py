"""What the notebooks and `oisd-lab report` read, checked before use: a grid folder, a folder of
collected tables, or one run folder. A missing or malformed input is a `MissingInput`: one line
naming what is missing and the command that makes it (in Jupyter, that line alone, no traceback).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from ..collect import collect
from ..errors import ConfigError
from ..run.folder import GRID_MANIFEST, RunDir
from .runs import (
    COLLECTED,
    GridData,
    load_grid,
    load_run,
    read_table,
    snapshot_steps,
    with_power,
    with_run,
)

REQUIRED_COLUMNS = {
    "results": ("run_id", "method", "task", "seed", "metric", "value"),
    "aggregate": ("method", "task", "metric", "mean", "ci95_low", "ci95_high", "n_seeds"),
    "paired": ("method", "task", "metric", "mean_diff", "ci95_low", "ci95_high", "n_pairs"),
}
DIAGNOSTIC_COLUMNS = ("step", "layer", "split")


class MissingInput(ConfigError):
    """A notebook or report input that is missing or malformed; the message is one line."""

    def _render_traceback_(self) -> list[str]:  # IPython shows these lines instead of a traceback
        return [f"{type(self).__name__}: {self}"]


def _grid_command(root: Path) -> str:
    return f"`oisd-lab grid {root.name}` (it writes runs/grids/{root.name})"


def _checked_manifest(root: Path) -> dict:
    if not root.is_dir():
        raise MissingInput(f"grid_dir {root}: no such folder; make it with {_grid_command(root)}")
    path = root / GRID_MANIFEST
    if not path.is_file():
        raise MissingInput(f"grid_dir {root}: no grid.json, so not a grid folder; make it with {_grid_command(root)}")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as err:
        raise MissingInput(f"grid_dir {root}: grid.json is not valid JSON ({err}); rewrite it with "
                           f"{_grid_command(root)}") from err
    if not isinstance(manifest, dict):
        raise MissingInput(f"grid_dir {root}: grid.json is not a grid manifest; rewrite it with {_grid_command(root)}")
    return manifest


def check_tables(grid: GridData, source: str) -> GridData:
    """The collected tables hold the columns the notebooks use; `source` says how to remake them."""
    for name in ("results", "aggregate"):
        if getattr(grid, name) is None:
            raise MissingInput(f"{grid.results_dir}: no {name}.parquet or {name}.csv; make it with {source}")
    for name in COLLECTED:
        frame = getattr(grid, name)
        lacking = [c for c in REQUIRED_COLUMNS[name] if frame is not None and c not in frame.columns]
        if lacking:
            raise MissingInput(f"{grid.results_dir}: {name} table lacks columns {', '.join(lacking)}; "
                               f"make it again with {source}")
    return grid


def _read(folder: Path, name: str) -> pd.DataFrame | None:
    try:
        return read_table(folder, name)
    except Exception as err:  # parquet and CSV readers raise many types; all mean "unreadable"
        raise MissingInput(f"{folder}: {name} table cannot be read ({type(err).__name__}); make it again with "
                           "`oisd-lab collect GRID_DIR --out DIR`") from err


def load_tables(tables_dir: str | Path) -> GridData:
    """A grid known only by its collected tables (e.g. the committed `reports/<grid>/tables`): `runs`
    from the results table, no per-step metrics or diagnostics."""
    folder = Path(tables_dir)
    source = f"`oisd-lab collect GRID_DIR --out {folder}`"
    if not folder.is_dir():
        raise MissingInput(f"tables_dir {folder}: no such folder; make the tables with {source}")
    tables = with_power({name: _read(folder, name) for name in COLLECTED})
    info = {}
    if (folder / "collect.json").is_file():
        try:
            info = json.loads((folder / "collect.json").read_text())
        except ValueError:
            info = {}
    empty = pd.DataFrame()
    grid = GridData(root=folder, name=info.get("grid", folder.parent.name), manifest=info, runs=empty,
                    metrics=empty, diagnostics=empty, eval=empty, results_dir=folder, **tables)
    check_tables(grid, source)
    keys = [c for c in ("run_id", "cell", "method", "task", "seed") if c in grid.results.columns]
    grid.runs = grid.results[keys].drop_duplicates("run_id").reset_index(drop=True).assign(finished=True)
    return grid


def ensure_collected(grid_dir: str | Path, results_dir: str | Path | None = None) -> GridData:
    """The grid with its collected tables, running `oisd_lab.collect.collect` when they are missing."""
    grid = load_grid(grid_dir, results_dir)
    if not grid.collected:
        collect(Path(grid_dir), out=results_dir)
        grid = load_grid(grid_dir, results_dir)
    return grid


def open_grid(grid_dir: str | Path | None = None, tables_dir: str | Path | None = None,
              results_dir: str | Path | None = None) -> GridData:
    """The grid in `grid_dir` with its collected tables (from `results_dir`, default the grid's own;
    collected now when missing); or, with `grid_dir` None, the collected tables in `tables_dir` alone."""
    if grid_dir is None:
        if tables_dir is None:
            raise MissingInput("give grid_dir (a folder written by `oisd-lab grid`) or tables_dir "
                               "(tables written by `oisd-lab collect`)")
        return load_tables(tables_dir)
    root = Path(grid_dir)
    manifest = _checked_manifest(root)
    if not any((root / "cells").glob("*/config.yaml")):
        raise MissingInput(f"grid_dir {root}: no runs under cells/ yet; run them with "
                           f"`oisd-lab grid {manifest.get('name', root.name)}`")
    grid = ensure_collected(root, results_dir)
    return check_tables(grid, f"`oisd-lab collect {root}`")


def _run_command(root: Path, fix: str = "") -> str:
    return f"`oisd-lab train run_dir={root}{' ' + fix if fix else ''}`"


def load_one_run(run_dir: str | Path) -> GridData:
    """One run folder as a grid of one cell (for the layer-inspection notebook)."""
    root = Path(run_dir)
    if not RunDir(root).config.is_file():
        raise MissingInput(f"run_dir {root}: not a run folder (no config.yaml); make one with {_run_command(root)}")
    run = load_run(root)
    info = {"run_id": run.info["run_id"], "cell": root.name, "method": run.info["method"],
            "task": run.info["task"], "seed": run.info["seed"]}
    lacking = [c for c in DIAGNOSTIC_COLUMNS if c not in run.diagnostics.columns]
    if lacking:
        raise MissingInput(f"run_dir {root}: no per-layer diagnostics (diagnostics.jsonl missing or without "
                           f"{', '.join(lacking)}); make them with {_run_command(root, 'log.every_n_steps=10')}")
    runs = pd.DataFrame([{**info, "variant": info["method"], "run_dir": str(root), "finished": bool(run.eval)}])
    return GridData(root=root, name=root.name, manifest={}, runs=runs, metrics=with_run(run.metrics, info),
                    diagnostics=with_run(run.diagnostics, info), eval=pd.DataFrame(), results_dir=root)


def open_runs(grid_dir: str | Path | None = None, run_dir: str | Path | None = None) -> GridData:
    """The runs to inspect layer by layer: every run of `grid_dir`, or the one run in `run_dir`."""
    if grid_dir is not None:
        root = Path(grid_dir)
        manifest = _checked_manifest(root)
        grid = load_grid(root)
        if grid.diagnostics.empty:
            raise MissingInput(f"grid_dir {root}: no run has per-layer diagnostics yet; run the grid with "
                               f"`oisd-lab grid {manifest.get('name', root.name)}`")
        return grid
    if run_dir is None:
        raise MissingInput("give grid_dir (a folder written by `oisd-lab grid`) or run_dir (a folder written by "
                           "`oisd-lab train`)")
    return load_one_run(run_dir)


def last_rollouts(grid: GridData, methods: list[str], task: str) -> dict[str, dict]:
    """The top rollout of the last snapshot of each method's lowest-seed run with snapshots."""
    out = {}
    for method in methods:
        dirs = [d for d in grid.run_dirs(method, task) if snapshot_steps(d)]
        if not dirs:
            raise MissingInput(f"{grid.root}: no run of {method} on {task} has snapshots; make them with "
                               f"{_run_command(Path('RUN_DIR'), f'method={method} task={task} log.snapshot_rollouts=2')}")
        out[method] = grid.snapshot(method, task=task)["rollouts"][0]
    return out
