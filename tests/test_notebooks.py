"""The notebooks run end to end (papermill) on a real, tiny grid: four runs laid out by the grid
module, collected by `oisd_lab.collect`, then 01 (ablations), 02 (layers) and 03 (report), and the
committed notebooks carry no outputs."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
from conftest import tiny_overrides

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
NAMES = ("01-ablations", "02-layer-inspection", "03-report")


@pytest.fixture(scope="module")
def grid_dir(tmp_path_factory, cache_dir):
    """grpo and oisd x seeds 0, 1 on the tiny setting, as `oisd-lab grid` lays them out."""
    from oisd_lab.collect import collect
    from oisd_lab.config import compose
    from oisd_lab.grid import cell_dir, load_grid
    from oisd_lab.train import train

    root = tmp_path_factory.mktemp("grid")
    base = [*tiny_overrides(root)[1:], "log.every_n_steps=2", "log.snapshot_rollouts=2",
            "log.wandb_mode=disabled", "num_threads=1"]
    spec = root / "nbtest.yaml"
    spec.write_text(json.dumps({"name": "nbtest", "base": base, "axes": {"method": ["grpo", "oisd"], "seed": [0, 1]}}))
    grid = load_grid(spec)
    (root / "grid.json").write_text(json.dumps(grid.manifest(), default=str))
    for cell in grid.cells:
        train(compose([*cell.overrides, f"run_dir={cell_dir(root, cell)}"]), log=lambda *a: None)
    collect(root)
    return root


def _execute(name: str, out: Path, **parameters) -> nbformat.NotebookNode:
    import papermill

    return papermill.execute_notebook(str(NOTEBOOKS / f"{name}.ipynb"), str(out / f"{name}.ipynb"),
                                      parameters=parameters, cwd=str(NOTEBOOKS), kernel_name="python3",
                                      progress_bar=False, log_output=False)


@pytest.mark.slow
def test_notebooks_run_and_write_the_report(grid_dir, tmp_path):
    out = tmp_path / "report"
    params = {"grid_dir": str(grid_dir), "out_dir": str(out)}
    _execute("01-ablations", tmp_path, **params)
    nb = _execute("02-layer-inspection", tmp_path, **params, smollm2=False)
    printed = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert "SmolLM2 section: skipped" in printed
    _execute("03-report", tmp_path, **params)
    figures = {p.name for p in (out / "figures").iterdir()}
    for name in ("bars_avg_at_k", "bars_greedy_acc", "paired_avg_at_k", "curves", "layers_arith",
                 "heatmaps_arith", "trajectory_arith_grpo", "trajectory_arith_oisd", "attention_arith_oisd"):
        assert {f"{name}.png", f"{name}.pdf"} <= figures, name
    tables = {p.name for p in (out / "tables").iterdir()}
    assert {"main.md", "main.tex", "paired.md", "paired.tex", "paper.md", "paper.tex",
            "results.csv", "aggregate.csv", "paired.csv", "collect.json"} <= tables
    readme = (out / "README.md").read_text()
    manifest = json.loads((grid_dir / "grid.json").read_text())
    assert "grid `nbtest`" in readme and "git commit (report):" in readme and "command:" in readme
    assert all(cell["run_id"] in readme for cell in manifest["cells"])
    assert "arith: OISD (both)" in readme


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebooks_have_no_outputs_and_a_parameters_cell(name):
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)
    assert "parameters" in code[0].metadata.get("tags", [])
    assert "grid_dir =" in code[0].source and "out_dir =" in code[0].source
