"""Collect a grid's finished runs into tidy tables: results, seed aggregates, paired differences.

`oisd-lab collect GRID_DIR [--out DIR]` reads `<GRID_DIR>/grid.json` and each finished cell's
`eval.json`, `diagnostics.jsonl` and `metrics.jsonl`, and writes (parquet and csv):

- `results`: one row per run x metric; columns `grid, run_id, cell, method, task, seed`, one column
  per other axis, then `metric, value, step`. Metrics: `greedy_acc`, `avg_at_k` (held-out, after
  RL), `greedy_acc_before`, `avg_at_k_before`, `train_seconds`, `layer/<metric>/L<kk>` (split
  `all` at the last diagnosed step; `kk` is the hidden-state index, as in metrics.jsonl) and
  `<key>_last10` (mean of the last 10 logged steps, e.g. `reward_last10`).
- `aggregate`: per method x task x other axes x metric over seeds: mean, std (ddof 1), 95%
  t-interval, n_seeds.
- `paired`: per method x task x other axes x metric, the difference from the `grpo` run with the
  same task, seed and other axes: mean_diff, std, 95% t-interval, n_pairs, and what the
  comparison can detect (`annotate`, from `oisd_lab.power`): `flag` ('zero variance' when every
  pair gives the same difference: no interval is claimed; 'n<2'), the paired t-test `p`, `mde80`
  (the smallest true difference detected with 80% power at alpha 0.05), `p_holm` (Holm-adjusted
  over the family of every comparison of the same metric in the table), `bonf_low`/`bonf_high`
  (Bonferroni-simultaneous 95% intervals over that family), `reference_gain` (for held-out
  accuracies: GRPO's own gain over the warm start on the task) and `non_result` (the detectable
  effect exceeds that gain: the design could not see an effect of the size that matters). With
  `--baseline-grid DIR`, the finished `grpo` runs of another grid join the tables and are the
  reference (matched on task and seed) for every value of this grid's axes.

Unfinished and failed cells go to `missing.csv`; `collect.json` records the grid, the run ids, the
git commit and the command.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from pathlib import Path

from . import power
from .errors import ConfigError
from .grid import compact
from .provenance import git_commit
from .run.folder import GRID_MANIFEST, RunDir, cell_folder, read_json, read_jsonl

ID_COLUMNS = ("grid", "run_id", "cell", "method", "task", "seed")
EVAL_METRICS = (("greedy_acc", "after"), ("avg_at_k", "after"),
                ("greedy_acc_before", "before"), ("avg_at_k_before", "before"))
WINDOW = 10
WINDOW_KEYS = ("reward", "loss/policy", "loss/think", "loss/attn", "entropy", "completions/mean_length")
DIAG_SKIP = ("step", "layer", "split", "tokens")
BASELINE = "grpo"

# two-sided 95% quantiles of Student's t, df = 1..30 (beyond: Cornish-Fisher expansion)
T975 = (12.706204736, 4.302652730, 3.182446305, 2.776445105, 2.570581836, 2.446911851,
        2.364624252, 2.306004135, 2.262157163, 2.228138852, 2.200985160, 2.178812830,
        2.160368656, 2.144786688, 2.131449546, 2.119905299, 2.109815578, 2.100922040,
        2.093024054, 2.085963447, 2.079613845, 2.073873068, 2.068657610, 2.063898562,
        2.059538553, 2.055529439, 2.051830516, 2.048407142, 2.045229642, 2.042272456)


def t_quantile(df: int) -> float:
    """t_{0.975, df}: scipy when installed, else the table above."""
    if df < 1:
        return math.nan
    try:
        from scipy.stats import t

        return float(t.ppf(0.975, df))
    except ImportError:
        pass
    if df <= len(T975):
        return T975[df - 1]
    z = 1.959963984540054
    return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3))


def mean_ci(values) -> dict:
    """mean, std (ddof 1), 95% t-interval and n of a list of numbers (NaN where n is too small)."""
    values = [float(v) for v in values]
    n = len(values)
    mean = sum(values) / n if n else math.nan
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan
    half = t_quantile(n - 1) * std / math.sqrt(n) if n > 1 else math.nan
    return {"mean": mean, "std": std, "ci95_low": mean - half, "ci95_high": mean + half, "n": n}


# ---------------------------------------------------------------------------- one run


def run_metrics(folder: Path) -> list[tuple[str, float, int]]:
    """(metric, value, step) of one finished run."""
    run = RunDir(folder)
    result = json.loads(run.eval.read_text())
    steps = int(result.get("steps", 0))
    out = [(name, result[when][name.removesuffix("_before")], 0 if when == "before" else steps)
           for name, when in EVAL_METRICS]
    out.append(("train_seconds", result["train_seconds"], steps))
    diag = [r for r in read_jsonl(run.diagnostics) if r.get("split") == "all"]
    if diag:
        last = max(r["step"] for r in diag)
        for row in (r for r in diag if r["step"] == last):
            out += [(f"layer/{k}/L{int(row['layer']):02d}", v, last) for k, v in row.items()
                    if k not in DIAG_SKIP and _number(v)]
    by_step: dict[int, dict] = {}
    for row in read_jsonl(run.metrics):
        if row.get("step") is not None:
            by_step.setdefault(int(row["step"]), {}).update(row)
    window = [by_step[s] for s in sorted(by_step)[-WINDOW:]]
    for key in WINDOW_KEYS:
        values = [r[key] for r in window if _number(r.get(key))]
        if values:
            out.append((f"{key}_last{WINDOW}", sum(values) / len(values), max(by_step)))
    return [(m, float(v), int(s)) for m, v, s in out if _number(v)]


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ---------------------------------------------------------------------------- tables


def read_manifest(grid_dir: Path) -> dict:
    path = Path(grid_dir) / GRID_MANIFEST
    if not path.is_file():
        raise ConfigError(f"{grid_dir}: no {GRID_MANIFEST}; run `oisd-lab grid FILE --out {grid_dir}` first")
    return json.loads(path.read_text())


def axis_columns(manifest: dict) -> list[str]:
    """Axes that are not already id columns (method, task, seed)."""
    return [k for k in manifest.get("axes", {}) if k not in ID_COLUMNS]


def results_table(grid_dir: Path, manifest: dict):
    """(results, missing) data frames of a grid folder."""
    import pandas as pd

    axes = axis_columns(manifest)
    rows, missing = [], []
    for cell in manifest["cells"]:
        folder = cell_folder(grid_dir, cell["id"])
        status = RunDir(folder).read_status()
        if status.get("status") != "finished" or not RunDir(folder).eval.is_file():
            missing.append({"cell": cell["id"], "run_id": cell["run_id"],
                            "status": status.get("status", "not started"),
                            "error": status.get("error", ""), "path": str(folder)})
            continue
        ids = {"grid": manifest["name"], "run_id": cell["run_id"], "cell": cell["id"],
               "method": cell["method"], "task": cell["task"], "seed": cell["seed"],
               **{k: _cell_value(cell["axes"][k]) for k in axes}}
        rows += [{**ids, "metric": m, "value": v, "step": s} for m, v, s in run_metrics(folder)]
    columns = [*ID_COLUMNS, *axes, "metric", "value", "step"]
    results = pd.DataFrame(rows, columns=columns)
    duplicated = results.duplicated(["run_id", "metric"])
    if duplicated.any():
        raise AssertionError(f"duplicate results rows: {results[duplicated].head().to_dict('records')}")
    return results, pd.DataFrame(missing, columns=["cell", "run_id", "status", "error", "path"])


def _cell_value(value):
    return value if isinstance(value, (int, float, str, bool)) else compact(value)


def aggregate(results, axes: list[str]):
    """Mean, std and 95% t-interval over seeds, per method x task x axes x metric."""
    import pandas as pd

    keys = ["method", "task", *axes, "metric"]
    rows = []
    for group, frame in results.groupby(keys, sort=True, dropna=False):
        stats = mean_ci(frame["value"])
        rows.append({**dict(zip(keys, group, strict=True)), **{k: stats[k] for k in ("mean", "std", "ci95_low", "ci95_high")},
                     "n_seeds": stats["n"]})
    return pd.DataFrame(rows, columns=[*keys, "mean", "std", "ci95_low", "ci95_high", "n_seeds"])


def paired(results, axes: list[str], baseline: str = BASELINE):
    """Each method's difference from `baseline` over runs matched on task, seed and the other axes
    that the baseline runs have values for: baseline runs from another grid (`--baseline-grid`),
    which lack this grid's axes, are the reference for every value of those axes."""
    import pandas as pd

    base_rows = results[results["method"] == baseline]
    match = ["task", "seed", *[a for a in axes if base_rows[a].notna().any()], "metric"]
    base = base_rows[[*match, "value"]].rename(columns={"value": "base"})
    merged = results[results["method"] != baseline].merge(base, on=match, how="inner")
    merged["diff"] = merged["value"] - merged["base"]
    keys = ["method", "task", *axes, "metric"]
    rows = []
    for group, frame in merged.groupby(keys, sort=True, dropna=False):
        stats = mean_ci(frame["diff"])
        rows.append({**dict(zip(keys, group, strict=True)), "baseline": baseline, "mean_diff": stats["mean"],
                     "std": stats["std"], "ci95_low": stats["ci95_low"], "ci95_high": stats["ci95_high"],
                     "n_pairs": stats["n"]})
    frame = pd.DataFrame(rows, columns=[*keys, "baseline", "mean_diff", "std", "ci95_low", "ci95_high", "n_pairs"])
    return annotate(frame, aggregate(results, axes), baseline)


GAINS = {"avg_at_k": "avg_at_k_before", "greedy_acc": "greedy_acc_before"}
POWER_COLUMNS = ("flag", "p", "mde80", "p_holm", "bonf_low", "bonf_high", "reference_gain", "non_result")


def reference_gains(aggregate, baseline: str = BASELINE) -> dict:
    """(task, metric) -> the baseline's mean gain over the warm start (after - before), for the
    held-out accuracies."""
    base = aggregate[aggregate["method"] == baseline]
    gains = {}
    for task, frame in base.groupby("task"):
        means = frame.groupby("metric")["mean"].mean()
        for after, before in GAINS.items():
            if after in means and before in means:
                gains[(task, after)] = float(means[after] - means[before])
    return gains


def annotate(paired, aggregate=None, baseline: str = BASELINE):
    """The paired table with what each comparison can detect (the columns in POWER_COLUMNS; see
    the module docstring). Works on tables collected before these columns existed: it needs only
    mean_diff, std and n_pairs, and the aggregate table for the reference gains."""
    out = paired.copy()
    gains = reference_gains(aggregate, baseline) if aggregate is not None else {}
    stats = [power.comparison(r.mean_diff, r.std, int(r.n_pairs)) for r in out.itertuples()]
    out["flag"] = [s["flag"] for s in stats]
    out["p"] = [s["p"] for s in stats]
    out["mde80"] = [s["mde80"] for s in stats]
    zero = out["flag"] != ""
    out.loc[zero, ["ci95_low", "ci95_high"]] = math.nan
    out["p_holm"] = math.nan
    out["bonf_low"] = math.nan
    out["bonf_high"] = math.nan
    for _, family in out.groupby("metric"):
        out.loc[family.index, "p_holm"] = power.holm(family["p"].tolist())
        level = power.bonferroni_level(len(family))
        for i, r in family.iterrows():
            if r["flag"] == "":
                out.loc[i, ["bonf_low", "bonf_high"]] = power.interval(r["mean_diff"], r["std"], int(r["n_pairs"]),
                                                                       level)
    out["reference_gain"] = [gains.get((r.task, r.metric), math.nan) for r in out.itertuples()]
    out["non_result"] = [power.non_result(m, g) if (t, k) in gains else None
                         for m, g, t, k in zip(out["mde80"], out["reference_gain"], out["task"], out["metric"],
                                               strict=True)]
    return out


def collect(grid_dir: str | Path, out: str | Path | None = None, baseline_grid: str | Path | None = None) -> dict:
    """Write the tables of a grid folder; returns a summary (also written to collect.json).

    `baseline_grid`: another grid folder whose finished `grpo` runs join the tables as the
    matched-seed reference (e.g. when this grid varies an OISD setting and holds no GRPO cells).
    """
    grid_dir = Path(grid_dir)
    out = Path(out) if out else grid_dir
    manifest = read_manifest(grid_dir)
    axes = axis_columns(manifest)
    results, missing = results_table(grid_dir, manifest)
    baseline_runs: list[str] = []
    grid_dirs = [grid_dir] if baseline_grid is None else [grid_dir, Path(baseline_grid)]
    if baseline_grid is not None:
        results, baseline_runs = _with_baseline(results, Path(baseline_grid), axes)
    out.mkdir(parents=True, exist_ok=True)
    tables = {"results": results, "aggregate": aggregate(results, axes), "paired": paired(results, axes)}
    for name, frame in tables.items():
        frame.to_parquet(out / f"{name}.parquet", index=False)
        frame.to_csv(out / f"{name}.csv", index=False)
    missing.to_csv(out / "missing.csv", index=False)
    if out.resolve() != grid_dir.resolve():
        shutil.copyfile(grid_dir / GRID_MANIFEST, out / GRID_MANIFEST)
    summary = {"grid": manifest["name"], "grid_dir": str(grid_dir.resolve()), "file": manifest.get("file"),
               "run_ids": sorted(results["run_id"].unique().tolist()),
               "missing": missing["cell"].tolist(), "cells": len(manifest["cells"]),
               "rows": len(results), "git": git_commit(), "run_commits": _run_commits(grid_dirs, results),
               **({"baseline_grid": str(baseline_grid), "baseline_run_ids": baseline_runs}
                  if baseline_grid is not None else {}),
               "command": " ".join(["oisd-lab", *sys.argv[1:]]) if sys.argv else "",
               "collected": time.strftime("%Y-%m-%d %H:%M:%S")}
    (out / "collect.json").write_text(json.dumps(summary, indent=2))
    return summary


def _with_baseline(results, baseline_grid: Path, axes: list[str]):
    """`results` plus the finished `grpo` runs of `baseline_grid` (this grid's axes left empty)."""
    import pandas as pd

    other, _ = results_table(baseline_grid, read_manifest(baseline_grid))
    other = other[other["method"] == BASELINE]
    if other.empty:
        raise ConfigError(f"--baseline-grid: {baseline_grid} has no finished {BASELINE} runs; "
                          f"give a grid folder with {BASELINE} cells (e.g. runs/grids/reference)")
    clash = set(other["run_id"]) & set(results["run_id"])
    if clash:
        raise ConfigError(f"--baseline-grid: {baseline_grid} shares runs with this grid "
                          f"({', '.join(sorted(clash)[:3])}); give a grid without them")
    other = other.reindex(columns=results.columns)  # this grid's axes: empty for the baseline runs
    return pd.concat([results, other], ignore_index=True), sorted(other["run_id"].unique().tolist())


def _run_commits(grid_dirs: list[Path], results) -> list[str]:
    """The code versions the collected runs were trained with (from their env.json)."""
    commits = set()
    for cell in results["cell"].unique():
        for grid_dir in grid_dirs:
            env = read_json(RunDir(cell_folder(grid_dir, cell)).env)
            if env:
                commits.add(env.get("commit"))
                break
    return sorted(c for c in commits if c)


# ---------------------------------------------------------------------------- command line


def add_arguments(parser) -> None:
    import argparse

    parser.description, parser.formatter_class = __doc__, argparse.RawDescriptionHelpFormatter
    parser.add_argument("grid_dir", help="a grid folder (holds grid.json), e.g. runs/grids/components")
    parser.add_argument("--out", help="where the tables go (default: the grid folder)")
    parser.add_argument("--baseline-grid", help="a grid folder whose finished grpo runs are the matched-seed "
                        "reference for this grid's paired table (e.g. runs/grids/reference)")


def run(args) -> int:
    summary = collect(args.grid_dir, args.out, args.baseline_grid)
    out = Path(args.out or args.grid_dir)
    print(f"[collect {summary['grid']}] {len(summary['run_ids'])}/{summary['cells']} runs, "
          f"{summary['rows']} rows -> {out}/results.parquet (+ aggregate, paired)")
    if summary["missing"]:
        print(f"missing {len(summary['missing'])} unfinished or failed cells (see {out}/missing.csv): "
              + ", ".join(summary["missing"][:5]) + (" ..." if len(summary["missing"]) > 5 else ""))
    return 0
