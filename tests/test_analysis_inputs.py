"""Notebook and report inputs: the committed tables and the shipped example run load; missing or
malformed inputs are one-line `MissingInput` errors that name the command making them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from oisd_lab import analysis as A

REPO = Path(__file__).resolve().parent.parent
TABLES = REPO / "reports" / "components" / "tables"
EXAMPLE = REPO / "examples" / "run"


def test_committed_tables_load_as_a_grid_without_runs():
    grid = A.open_grid(None, TABLES)
    assert grid.name == "components" and len(grid.runs) == 60 and grid.metrics.empty
    assert sorted(grid.runs["method"].unique()) == sorted(A.METHOD_ORDER)
    assert grid.run_dirs("grpo", "arith") == []  # no run folders behind the tables


def test_report_of_the_tables_alone(tmp_path):
    out = A.write_report(None, tmp_path / "report", tables_dir=TABLES)
    names = {p.name for p in (out / "figures").iterdir()}
    assert {"bars_avg_at_k.png", "paired_avg_at_k.pdf", "paired_greedy_acc.png"} <= names
    assert not any(n.startswith(("curves", "heatmaps", "trajectory")) for n in names)
    readme = (out / "README.md").read_text()
    assert "- runs: 60 (60 finished)" in readme
    def rows(path: Path) -> list[str]:  # the caption names K and n only when the runs are at hand
        return [line for line in path.read_text().splitlines() if line.startswith("|")]

    assert rows(out / "tables" / "main.md") == rows(TABLES / "main.md") and len(rows(TABLES / "main.md")) == 7


def _copy_tables(tmp_path: Path) -> Path:
    folder = tmp_path / "tables"
    shutil.copytree(TABLES, folder)
    for parquet in folder.glob("*.parquet"):
        parquet.unlink()
    return folder


def test_a_table_without_a_column_names_it_and_the_collect_command(tmp_path):
    folder = _copy_tables(tmp_path)
    lines = (folder / "aggregate.csv").read_text().splitlines()
    (folder / "aggregate.csv").write_text("\n".join(",".join(row.split(",")[:-1]) for row in lines) + "\n")
    with pytest.raises(A.MissingInput) as caught:
        A.open_grid(None, folder)
    assert str(caught.value) == (f"{folder}: aggregate table lacks columns n_seeds; make it again with "
                                 f"`oisd-lab collect GRID_DIR --out {folder}`")


def test_an_unreadable_table_and_a_broken_grid_manifest(tmp_path):
    folder = _copy_tables(tmp_path)
    (folder / "results.parquet").write_bytes(b"not parquet")
    with pytest.raises(A.MissingInput, match=r"results table cannot be read \(.*\); make it again with `oisd-lab collect"):
        A.open_grid(None, folder)
    grid = tmp_path / "grid"
    grid.mkdir()
    (grid / "grid.json").write_text("{")
    with pytest.raises(A.MissingInput, match=r"grid.json is not valid JSON .*; rewrite it with `oisd-lab grid grid`"):
        A.open_grid(grid)
    (grid / "grid.json").write_text(json.dumps({"name": "mine", "cells": []}))
    with pytest.raises(A.MissingInput, match=r"no runs under cells/ yet; run them with `oisd-lab grid mine`$"):
        A.open_grid(grid)


def test_missing_input_renders_as_one_line_in_ipython():
    err = A.MissingInput("run_dir x: not a run folder (no config.yaml); make one with `oisd-lab train run_dir=x`")
    assert err._render_traceback_() == [f"MissingInput: {err}"]


def test_the_example_run_is_a_one_run_grid_with_diagnostics_and_snapshots():
    grid = A.open_runs(None, EXAMPLE)
    assert list(grid.runs["method"]) == ["oisd"] and list(grid.runs["task"]) == ["arith"]
    assert {"run_id", "method", "task", "seed", "step", "layer", "split"} <= set(grid.diagnostics.columns)
    assert grid.metrics["step"].tolist() == list(range(1, len(grid.metrics) + 1))
    rollout = A.last_rollouts(grid, ["oisd"], "arith")["oisd"]
    assert rollout["student_layers"] and rollout["attention"]


def test_a_run_without_snapshots_or_diagnostics_names_the_setting(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(EXAMPLE, run)
    shutil.rmtree(run / "snapshots")
    grid = A.open_runs(None, run)
    with pytest.raises(A.MissingInput, match=r"no run of oisd on arith has snapshots; make them with "
                                             r"`oisd-lab train .*log.snapshot_rollouts=2`"):
        A.last_rollouts(grid, ["oisd"], "arith")
    (run / "diagnostics.jsonl").unlink()
    with pytest.raises(A.MissingInput, match=r"no per-layer diagnostics .*log.every_n_steps=10`$"):
        A.open_runs(None, run)
