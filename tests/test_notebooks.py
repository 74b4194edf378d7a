"""The notebooks run end to end (papermill): with their default parameters on a copy of the
repository (the committed component tables and the shipped example run), and on a real, tiny grid
(four runs laid out by the grid module, collected by `oisd_lab.collect`); a missing input stops the
first cell that needs it with one line naming the command that makes it; the committed notebooks
carry no outputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nbformat
import pytest
from conftest import tiny_overrides

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"
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


def _execute(name: str, out: Path, notebooks: Path = NOTEBOOKS, **parameters) -> nbformat.NotebookNode:
    import papermill

    return papermill.execute_notebook(str(notebooks / f"{name}.ipynb"), str(out / f"{name}.ipynb"),
                                      parameters=parameters, cwd=str(notebooks), kernel_name="python3",
                                      progress_bar=False, log_output=False)


def _files(root: Path) -> dict[str, int]:
    """Modification times of the files outside runs/ (git-ignored, where the notebooks write)."""
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")
            if p.is_file() and p.relative_to(root).parts[0] != "runs"}


def _assert_figure(png: Path) -> None:
    """A real picture: readable, not tiny, not one flat colour; its PDF beside it."""
    import matplotlib.image as mpimg

    image = mpimg.imread(png)
    assert image.shape[0] > 200 and image.shape[1] > 200, png
    assert image[..., :3].std() > 0.02, png
    assert png.with_suffix(".pdf").read_bytes().startswith(b"%PDF"), png


DEFAULT_FIGURES = {
    "01-ablations": ("components", ("bars_avg_at_k", "bars_greedy_acc", "paired_avg_at_k")),
    "02-layer-inspection": ("layers", ("heatmaps_arith", "layers_arith", "trajectory_arith_oisd",
                                       "attention_arith_oisd")),
    "03-report": ("report", ("bars_avg_at_k", "bars_greedy_acc", "paired_avg_at_k", "paired_greedy_acc")),
}


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """The repository as a fresh clone has it: no runs/, no outputs."""
    root = tmp_path_factory.mktemp("clone") / "repo"
    shutil.copytree(REPO, root, ignore=shutil.ignore_patterns(".git", "runs", "wandb", ".venv", "__pycache__",
                                                              ".pytest_cache", ".ruff_cache", "*.egg-info"))
    return root


@pytest.mark.slow
@pytest.mark.parametrize("name", list(DEFAULT_FIGURES))
def test_notebook_runs_with_its_defaults_on_a_fresh_clone(name, clone, tmp_path):
    before = _files(clone)
    _execute(name, tmp_path, notebooks=clone / "notebooks")
    folder, names = DEFAULT_FIGURES[name]
    figures = clone / "runs" / "notebooks" / folder / "figures"
    for figure in names:
        _assert_figure(figures / f"{figure}.png")
    assert _files(clone) == before  # only runs/ was written
    if name == "03-report":
        readme = (clone / "runs" / "notebooks" / folder / "README.md").read_text()
        assert "# Report: grid `components`" in readme and "- runs: 60 (60 finished)" in readme


BAD_INPUTS = [
    ("01-ablations", {"grid_dir": "../runs/grids/components"}, "no such folder; make it with `oisd-lab grid components`"),
    ("01-ablations", {"tables_dir": "../reports"}, "no results.parquet or results.csv; make it with `oisd-lab collect"),
    ("02-layer-inspection", {"run_dir": "../runs/none"}, "not a run folder (no config.yaml); make one with `oisd-lab train"),
    ("02-layer-inspection", {"grid_dir": "../reports/components"}, "no grid.json, so not a grid folder; make it with `oisd-lab grid"),
    ("03-report", {"tables_dir": "../examples"}, "no results.parquet or results.csv; make it with `oisd-lab collect"),
]


@pytest.mark.slow
@pytest.mark.parametrize("name, parameters, message", BAD_INPUTS)
def test_a_missing_input_is_one_line_naming_the_command_that_makes_it(name, parameters, message, clone, tmp_path):
    from papermill.exceptions import PapermillExecutionError

    with pytest.raises(PapermillExecutionError):
        _execute(name, tmp_path, notebooks=clone / "notebooks", **parameters)
    nb = nbformat.read(tmp_path / f"{name}.ipynb", as_version=4)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert len(errors) == 1
    assert errors[0].ename == "MissingInput" and message in errors[0].evalue
    assert errors[0].traceback == [f"MissingInput: {errors[0].evalue}"]  # one line, no frames from the package
    assert "\n" not in errors[0].evalue


@pytest.mark.slow
def test_notebooks_run_and_write_the_report(grid_dir, tmp_path):
    out = tmp_path / "report"
    params = {"grid_dir": str(grid_dir), "out_dir": str(out)}
    _execute("01-ablations", tmp_path, **params)
    nb = _execute("02-layer-inspection", tmp_path, **params, smollm2=False)
    printed = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert "SmolLM2 section: skipped (smollm2 = False)" in printed
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
