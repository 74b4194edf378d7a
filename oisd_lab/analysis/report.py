"""`oisd-lab report GRID_DIR --out reports/NAME`: a grid's figures (PNG + PDF), tables (Markdown +
LaTeX + the collected CSVs) and a README recording grid, run ids, git commit, command and date.

Runs after training, from the collected tables only (`oisd_lab.collect`, run first when they are
missing), so every number in the report is a value of those tables, scaled to % for accuracies and
rounded.
"""

from __future__ import annotations

import json
import shlex
import shutil
import time
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from ..provenance import commit_label
from . import figures, gradients, tables
from .inputs import open_grid
from .runs import COLLECTED, GridData


def add_arguments(parser) -> None:
    parser.add_argument("grid_dir", help="a grid directory (holding grid.json and cells/)")
    parser.add_argument("--out", default=None, help="report folder (default: reports/<grid name>)")
    parser.add_argument("--results", default=None,
                        help="collected tables folder (default: <grid_dir>/results or <grid_dir>; collected into "
                             "it, or into the grid folder, when missing)")


def run(args) -> int:
    options = [*(["--out", args.out] if args.out else []), *(["--results", args.results] if args.results else [])]
    command = shlex.join(["oisd-lab", "report", args.grid_dir, *options])
    out = write_report(args.grid_dir, args.out, results_dir=args.results, command=command)
    print(out / "README.md")
    return 0


def _write_table(folder: Path, name: str, table: pd.DataFrame, caption: str) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    md = tables.to_markdown(table, caption)
    (folder / f"{name}.md").write_text(md)
    (folder / f"{name}.tex").write_text(tables.to_latex(table, caption, label=f"tab:{name}"))
    return md


def _eval_note(grid: GridData) -> str:
    if grid.eval.empty or "k" not in grid.eval:
        return "Avg@K"
    ks, ns = sorted(set(grid.eval["k"].dropna().astype(int))), sorted(set(grid.eval["n"].dropna().astype(int)))
    return f"Avg@K with K = {'/'.join(map(str, ks))} samples per problem on {'/'.join(map(str, ns))} held-out problems"


def write_tables(grid: GridData, out: Path) -> dict[str, str]:
    """tables/*.md and *.tex, plus copies of the collected CSVs; returns the Markdown by name."""
    folder, note = out / "tables", _eval_note(grid)
    md = {"main": _write_table(folder, "main", tables.method_task_table(grid.aggregate),
                               f"Held-out accuracy in %, mean ± 95% CI half-width over seeds ({note}; "
                               "greedy accuracy: one greedy sample).")}
    if grid.paired is not None and not grid.paired.empty:
        md["paired"] = _write_table(folder, "paired", tables.paired_table(grid.paired),
                                    "Paired difference to GRPO (same task and seed), percentage points: "
                                    "mean [95% CI] over seed pairs, and MDE80, the smallest true difference "
                                    "the design detects with 80% power (two-sided alpha 0.05); '(non-result)': "
                                    "MDE80 exceeds GRPO's own gain over the warm start; 'zero variance': every "
                                    "pair gave the same difference, so no interval is claimed.")
    md["paper"] = _write_table(folder, "paper", tables.beside_paper(grid.aggregate, grid.paired),
                               "Ours next to the paper's Qwen3-4B headline numbers (Avg@K %, arXiv 2605.29089; "
                               "different model, tasks and scale: compare directions, not values).")
    md.update(_gradient_tables(grid, folder))
    md["aggregate"] = _write_table(folder, "aggregate", tables.aggregate_table(grid.aggregate),
                                   "Every scalar metric, raw units: mean, std, 95% CI over seeds.")
    same = folder.resolve() == grid.results_dir.resolve()  # the report writes beside the collected tables
    for name in COLLECTED:
        frame = getattr(grid, name)
        if (grid.results_dir / f"{name}.csv").is_file():
            if not same:
                shutil.copy(grid.results_dir / f"{name}.csv", folder / f"{name}.csv")
        elif frame is not None:
            frame.to_csv(folder / f"{name}.csv", index=False)
    if (grid.results_dir / "collect.json").is_file() and not same:
        shutil.copy(grid.results_dir / "collect.json", folder / "collect.json")
    return md


def _gradient_tables(grid: GridData, folder: Path) -> dict[str, str]:
    """The gradient view per variant, when the runs logged it (`log.gradient_view`)."""
    if not gradients.has_gradient_view(grid.metrics):
        return {}
    by = "variant" if grid.axes else "method"
    table = gradients.gradient_table(grid.metrics, grid.eval, by=by)
    return {"gradients": _write_table(
        folder, "gradients", table,
        "Gradient view, mean over logging steps then mean ± std over seeds: each alignment term's "
        "gradient norm over the policy gradient's (norm ratio: a ratio of gradient norms, which can "
        "exceed 1, not a fraction of the update) and its cosine with the policy gradient; where logged, "
        "the same ratio and cosine after AdamW's preconditioning (Adam ratio, Adam cos) and each term's "
        "cosine with its own gradient on the previous logging step (cos prev); the "
        "unweighted mean per-token JSD by advantage sign, cov(advantage, length), the fraction of groups "
        "with zero advantage, and the view's own time over the rest of the step's forward and backward.")}


def _pair(methods) -> list[str]:
    """GRPO and OISD when both ran, else the first two methods in the paper's order."""
    present = tables.ordered(methods)
    return ["grpo", "oisd"] if {"grpo", "oisd"} <= set(present) else present[:2]


def _student_layers(grid: GridData, task: str) -> list[int]:
    for method in ("oisd", *tables.ordered(grid.runs["method"])):
        try:
            return grid.snapshot(method, task=task)["rollouts"][0].get("student_layers", [])
        except (FileNotFoundError, IndexError):
            continue
    return []


def _result_specs(grid: GridData, by: str) -> list[tuple[str, callable]]:
    specs = []
    for metric in ("avg_at_k", "greedy_acc"):
        if metric in set(grid.aggregate["metric"]):
            specs.append((f"bars_{metric}", lambda m=metric: figures.bar_chart(grid.aggregate, m, grid.results)))
        if grid.paired is not None and metric in set(grid.paired["metric"]):
            specs.append((f"paired_{metric}", lambda m=metric: figures.forest_plot(grid.paired, m)))
    if not grid.metrics.empty:
        specs.append(("curves", lambda: figures.training_curves(grid.metrics, by=by)))
    return specs


def _layer_specs(grid: GridData, by: str) -> list[tuple[str, callable]]:
    """Per task: per-layer lines of every method (variant), heatmaps of GRPO vs OISD (or of every
    variant when the grid has other axes)."""
    specs, d = [], grid.diagnostics
    for task in sorted(d["task"].unique()) if not d.empty else []:
        dt = d[d["task"] == task]
        students = _student_layers(grid, task) if by == "method" else []  # variants may differ in it
        pair = None if by != "method" else _pair(dt["method"].unique())
        specs.append((f"layers_{task}", lambda dt=dt, s=students: figures.layer_lines(
            dt, methods=None, student_layers=s, by=by)))
        specs.append((f"heatmaps_{task}", lambda dt=dt, p=pair: figures.layer_heatmaps(dt, methods=p, by=by)))
    return specs


def _snapshot_specs(grid: GridData) -> list[tuple[str, callable]]:
    """Per task, for GRPO and OISD (lowest seed): the lens trajectory and attention maps of the
    highest-advantage rollout of the last snapshot."""
    specs = []
    for task in sorted(grid.runs["task"].unique()) if not grid.runs.empty else []:
        for method in _pair(grid.runs[grid.runs["task"] == task]["method"].unique()):
            try:
                rollout = grid.snapshot(method, task=task)["rollouts"][0]
            except (FileNotFoundError, IndexError):
                continue
            specs.append((f"trajectory_{task}_{method}", lambda r=rollout: figures.prediction_trajectory(r)))
            if rollout.get("attention"):
                specs.append((f"attention_{task}_{method}", lambda r=rollout: figures.attention_maps(r)))
    return specs


def figure_specs(grid: GridData) -> list[tuple[str, callable]]:
    """(name, draw) for every figure this grid has data for; lines split by `variant` (method and
    the other axis values) when the grid has axes beyond method, task and seed."""
    by = "variant" if grid.axes else "method"
    view = [("gradient_norm_ratios", lambda: gradients.gradient_norm_ratios(grid.metrics, by=by))] \
        if gradients.has_gradient_view(grid.metrics) else []
    if gradients.has_cos_prev(grid.metrics):
        view.append(("gradient_cos_prev", lambda: gradients.gradient_cos_prev(grid.metrics, by=by)))
    return [*_result_specs(grid, by), *view, *_layer_specs(grid, by), *_snapshot_specs(grid)]


def write_figures(grid: GridData, out: Path) -> list[str]:
    names = []
    for name, draw in figure_specs(grid):
        fig = draw()
        figures.save_figure(fig, out / "figures", name)
        plt.close(fig)
        names.append(name)
    return names


def _collect_info(grid: GridData) -> dict:
    try:
        return json.loads((grid.results_dir / "collect.json").read_text())
    except (OSError, ValueError):
        return {}


def _provenance(grid: GridData) -> list[str]:
    """Cells left out of the tables and the commits the runs were trained at (from `collect.json`)."""
    info, lines = _collect_info(grid), []
    if info.get("missing"):
        lines.append(f"- not in the tables (unfinished or failed): {', '.join(info['missing'])}")
    if info.get("baseline_grid"):
        lines.append(f"- GRPO reference: {len(info.get('baseline_run_ids', []))} runs of the grid in "
                     f"`{info['baseline_grid']}` (`oisd-lab collect --baseline-grid`), matched by task and seed")
    if info.get("run_commits"):
        lines.append(f"- runs trained at commit(s): {', '.join(f'`{c}`' for c in info['run_commits'])}")
    return lines


def _runs_table(grid: GridData) -> pd.DataFrame:
    cols = [c for c in grid.runs.columns if c not in ("run_dir",)]
    return grid.runs[cols].set_index("cell")


def readme(grid: GridData, md: dict[str, str], names: list[str], command: str) -> str:
    sentences = tables.summary_sentences(grid.paired) if grid.paired is not None else []
    lines = [f"# Report: grid `{grid.name}`", "",
             f"- grid directory: `{grid.root}`",
             f"- collected tables: `{grid.results_dir}`",
             f"- runs: {len(grid.runs)} ({int(grid.runs['finished'].sum()) if not grid.runs.empty else 0} finished)",
             *_provenance(grid),
             f"- git commit (report): `{commit_label()}`",
             f"- command: `{command}`",
             f"- date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}", "",
             "## Summary (OISD variants vs GRPO, paired by seed)", "",
             *([f"- {s}" for s in sentences] or ["- No paired comparison: GRPO and another method on the "
                                                 "same task and seeds are needed."]), "",
             *(["Each interval is a per-comparison 95% t-interval over seed pairs. The Holm-adjusted p "
                f"corrects for the {len(sentences)} comparisons above (family-wise error 0.05); Bonferroni-"
                "simultaneous intervals are the `bonf_low`, `bonf_high` columns of `tables/paired.csv`. "
                "A comparison whose detectable effect (80% power) exceeds GRPO's own gain over the warm "
                "start is a non-result: it could not have seen an effect of the size that matters.", ""]
               if len(sentences) > 1 else []),
             "## Results", "", md["main"], *(["", md["paired"]] if "paired" in md else []), "",
             *(["## Gradient view", "", md["gradients"], ""] if "gradients" in md else []),
             "## Beside the paper", "", md["paper"], "",
             "## Figures", "", *[f"- `{n}`: [PNG](figures/{n}.png), [PDF](figures/{n}.pdf)" for n in names], "",
             "## Runs", "", tables.to_markdown(_runs_table(grid)), "",
             "All tables are also in `tables/` as Markdown and LaTeX (`aggregate.*` holds every scalar "
             "metric), with copies of the collected CSVs."]
    return "\n".join(lines) + "\n"


def write_report(grid_dir: str | Path | None, out_dir: str | Path | None = None,
                 results_dir: str | Path | None = None, command: str | None = None,
                 tables_dir: str | Path | None = None) -> Path:
    """Collect if needed, then write figures/, tables/ and README.md under `out_dir`
    (default `reports/<grid name>`); returns `out_dir`. With `grid_dir` None, the report of the
    collected tables in `tables_dir` alone (no per-step, per-layer or snapshot figures)."""
    grid = open_grid(grid_dir, tables_dir, results_dir)
    out = Path(out_dir) if out_dir else Path("reports") / grid.name
    out.mkdir(parents=True, exist_ok=True)
    md = write_tables(grid, out)
    names = write_figures(grid, out)
    command = command or f"write_report({str(grid_dir)!r}, {str(out)!r})"
    (out / "README.md").write_text(readme(grid, md, names, command))
    return out
