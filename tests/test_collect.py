"""`collect` on hand-made grid folders: the tidy table, seed aggregates and paired differences
checked against hand computations, missing cells, uniqueness, and the t quantiles."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from oisd_lab import collect as C
from oisd_lab.cli import main

T2 = 4.302652730  # t_{0.975, 2}
GREEDY = {("grpo", 0): 0.2, ("grpo", 1): 0.4, ("grpo", 2): 0.6,
          ("oisd", 0): 0.3, ("oisd", 1): 0.6, ("oisd", 2): 0.6, ("oisd_logit", 0): 0.5}


def make_run(folder: Path, method: str, seed: int, status: str = "finished", error: str | None = None) -> None:
    """A finished run directory as train() leaves it, with chosen numbers."""
    folder.mkdir(parents=True)
    (folder / "status.json").write_text(json.dumps({"status": status, "run_id": "w", **({"error": error} if error else {})}))
    if status != "finished":
        return
    result = {"before": {"greedy_acc": 0.1, "avg_at_k": 0.05, "k": 4, "n": 8},
              "after": {"greedy_acc": GREEDY[method, seed], "avg_at_k": 0.1 if method == "grpo" else 0.2 + 0.1 * seed,
                        "k": 4, "n": 8},
              "train_seconds": 10.0 * (seed + 1), "steps": 12, "method": method, "task": "arith", "seed": seed}
    (folder / "eval.json").write_text(json.dumps(result))
    rows = []
    for step in (5, 10):
        for layer in range(3):
            for split, offset in (("all", 0.0), ("pos", 0.5)):
                rows.append({"step": step, "layer": layer, "split": split, "tokens": 100,
                             "lens_acc": layer / 10 + step / 100 + seed / 100 + offset, "kl": 1 / (layer + 1),
                             "attn_jsd_head": [0.1, 0.2]})
    (folder / "diagnostics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    metrics = []
    for step in range(1, 13):
        row = {"step": step, "reward": step / 10 + seed / 100, "step_time": 1.0}
        if method != "grpo":
            row["loss/think"] = 0.5
        metrics.append(row)
    metrics.append({"step": 12, "diag/kl/all/L01": 0.3})  # a second row for the same step
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics) + '{"step": 13, "rew')


def make_grid(root: Path, cells: list[tuple], axes: dict | None = None, name: str = "hand") -> Path:
    """grid.json and cell folders; cells are (method, seed, status[, error[, axis values]])."""
    manifest = {"name": name, "file": "hand.yaml", "base": [], "overrides": [],
                "axes": axes or {"method": ["grpo", "oisd", "oisd_logit"], "seed": [0, 1, 2]}, "cells": []}
    for index, (method, seed, status, *rest) in enumerate(cells):
        error = rest[0] if rest else None
        extra_axes = rest[1] if len(rest) > 1 else {}
        cell_id = f"{method}-arith-s{seed}-{index:08d}"
        manifest["cells"].append({"index": index, "id": cell_id, "run_id": f"{index:012d}", "overrides": [],
                                  "axes": {"method": method, "seed": seed, **extra_axes},
                                  "method": method, "task": "arith", "seed": seed})
        make_run(root / "cells" / cell_id, method, seed, status, error)
    (root / "grid.json").write_text(json.dumps(manifest))
    return root


HAND = [("grpo", 0, "finished"), ("grpo", 1, "finished"), ("grpo", 2, "finished"),
        ("oisd", 0, "finished"), ("oisd", 1, "finished"), ("oisd", 2, "finished"),
        ("oisd_logit", 0, "finished"), ("oisd_logit", 1, "running"),
        ("oisd_logit", 2, "failed", "error: boom")]


def one(frame: pd.DataFrame, **where) -> pd.Series:
    sel = frame
    for key, value in where.items():
        sel = sel[sel[key] == value]
    assert len(sel) == 1, (where, sel)
    return sel.iloc[0]


def test_results_table_rows_and_values(tmp_path):
    root = make_grid(tmp_path / "g", HAND)
    C.collect(root)
    results = pd.read_parquet(root / "results.parquet")
    assert list(results.columns) == ["grid", "run_id", "cell", "method", "task", "seed", "metric", "value", "step"]
    # 5 eval metrics + 3 layers x (lens_acc, kl) + reward_last10 (+ loss/think_last10 for OISD runs)
    assert results.groupby("cell").size().to_dict() == {
        "grpo-arith-s0-00000000": 12, "grpo-arith-s1-00000001": 12, "grpo-arith-s2-00000002": 12,
        "oisd-arith-s0-00000003": 13, "oisd-arith-s1-00000004": 13, "oisd-arith-s2-00000005": 13,
        "oisd_logit-arith-s0-00000006": 13}
    assert not results.duplicated(["run_id", "metric"]).any()
    r = results[results["cell"] == "oisd-arith-s1-00000004"]
    assert one(r, metric="greedy_acc")[["value", "step"]].tolist() == [0.6, 12]
    assert one(r, metric="greedy_acc_before")[["value", "step"]].tolist() == [0.1, 0]
    assert one(r, metric="avg_at_k")["value"] == pytest.approx(0.3)
    assert one(r, metric="avg_at_k_before")["value"] == 0.05
    assert one(r, metric="train_seconds")["value"] == 20.0
    # last diagnosed step (10), split all: layer/10 + 10/100 + seed/100
    lens = one(r, metric="layer/lens_acc/L01")
    assert (lens["value"], lens["step"]) == (pytest.approx(0.1 + 0.1 + 0.01), 10)
    assert one(r, metric="layer/kl/L02")["value"] == pytest.approx(1 / 3)
    # mean reward of steps 3..12 (step/10 + seed/100); the torn last line is skipped
    window = one(r, metric="reward_last10")
    assert (window["value"], window["step"]) == (pytest.approx(0.75 + 0.01), 12)
    assert one(r, metric="loss/think_last10")["value"] == 0.5
    assert pd.read_csv(root / "results.csv", dtype={"run_id": str}).equals(results)


def test_aggregate_matches_hand_computed_t_intervals(tmp_path):
    root = make_grid(tmp_path / "g", HAND)
    C.collect(root)
    agg = pd.read_parquet(root / "aggregate.parquet")
    assert list(agg.columns) == ["method", "task", "metric", "mean", "std", "ci95_low", "ci95_high", "n_seeds"]
    g = one(agg, method="grpo", metric="greedy_acc")
    half = T2 * 0.2 / math.sqrt(3)  # = 0.4968275...
    assert g[["mean", "std", "ci95_low", "ci95_high", "n_seeds"]].tolist() == pytest.approx(
        [0.4, 0.2, 0.4 - half, 0.4 + half, 3])
    assert g["ci95_low"] == pytest.approx(-0.0968275424) and g["ci95_high"] == pytest.approx(0.8968275424)
    o = one(agg, method="oisd", metric="greedy_acc")  # 0.3, 0.6, 0.6: std sqrt(0.03)
    assert o[["mean", "std", "ci95_low", "ci95_high"]].tolist() == pytest.approx(
        [0.5, 0.1732050808, 0.069734727, 0.930265273])
    flat = one(agg, method="grpo", metric="avg_at_k")  # identical seeds: zero-width interval
    assert flat[["mean", "std", "ci95_low", "ci95_high"]].tolist() == pytest.approx([0.1, 0.0, 0.1, 0.1])
    single = one(agg, method="oisd_logit", metric="greedy_acc")
    assert single["mean"] == 0.5 and single["n_seeds"] == 1 and math.isnan(single["std"])
    assert math.isnan(single["ci95_low"])
    secs = one(agg, method="grpo", metric="train_seconds")
    assert (secs["mean"], secs["std"]) == (20.0, 10.0)


def test_paired_differences_from_grpo(tmp_path):
    root = make_grid(tmp_path / "g", HAND)
    C.collect(root)
    paired = pd.read_parquet(root / "paired.parquet")
    assert set(paired["method"]) == {"oisd", "oisd_logit"} and set(paired["baseline"]) == {"grpo"}
    d = one(paired, method="oisd", metric="greedy_acc")  # diffs 0.1, 0.2, 0.0
    assert d[["mean_diff", "std", "ci95_low", "ci95_high", "n_pairs"]].tolist() == pytest.approx(
        [0.1, 0.1, -0.1484137712, 0.3484137712, 3])
    a = one(paired, method="oisd", metric="avg_at_k")  # 0.2, 0.3, 0.4 against 0.1: diffs 0.1, 0.2, 0.3
    assert a[["mean_diff", "std", "n_pairs"]].tolist() == pytest.approx([0.2, 0.1, 3])
    lone = one(paired, method="oisd_logit", metric="greedy_acc")  # only seed 0 is finished
    assert lone["mean_diff"] == pytest.approx(0.3) and lone["n_pairs"] == 1 and math.isnan(lone["std"])


def test_missing_cells_metadata_and_command_line(tmp_path, capsys):
    root = make_grid(tmp_path / "g", HAND)
    out = tmp_path / "tables"
    assert main(["collect", str(root), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("[collect hand] 7/9 runs, 88 rows")
    assert "missing 2 unfinished or failed cells" in printed
    missing = pd.read_csv(out / "missing.csv").fillna("")
    assert missing[["cell", "status", "error"]].values.tolist() == [
        ["oisd_logit-arith-s1-00000007", "running", ""], ["oisd_logit-arith-s2-00000008", "failed", "error: boom"]]
    meta = json.loads((out / "collect.json").read_text())
    assert meta["grid"] == "hand" and meta["cells"] == 9 and meta["rows"] == 88
    assert meta["run_ids"] == [f"{i:012d}" for i in range(7)]
    assert meta["missing"] == missing["cell"].tolist()
    assert "commit" in meta["git"] and meta["command"].startswith("oisd-lab")
    assert json.loads((out / "grid.json").read_text()) == json.loads((root / "grid.json").read_text())
    assert {p.name for p in out.iterdir()} == {
        "results.parquet", "results.csv", "aggregate.parquet", "aggregate.csv", "paired.parquet", "paired.csv",
        "missing.csv", "collect.json", "grid.json"}
    assert main(["collect", str(tmp_path / "nothing")]) == 2
    assert "no grid.json" in capsys.readouterr().err


def test_other_axes_become_columns_and_groups(tmp_path):
    axes = {"method.layers": [[1], [2]], "seed": [0, 1]}
    cells = [("oisd", s, "finished", None, {"method.layers": layers}) for layers in ([1], [2]) for s in (0, 1)]
    root = make_grid(tmp_path / "g", cells, axes=axes, name="layers")
    C.collect(root)
    results = pd.read_parquet(root / "results.parquet")
    assert list(results.columns)[:7] == ["grid", "run_id", "cell", "method", "task", "seed", "method.layers"]
    assert sorted(results["method.layers"].unique()) == ["1", "2"]
    agg = pd.read_parquet(root / "aggregate.parquet")
    greedy = agg[agg["metric"] == "greedy_acc"]
    assert greedy[["method.layers", "n_seeds"]].values.tolist() == [["1", 2], ["2", 2]]
    assert pd.read_parquet(root / "paired.parquet").empty  # no grpo runs to pair with


def test_a_baseline_grid_is_the_reference_for_every_axis_value(tmp_path, capsys):
    axes = {"method.layers": [[1], [2]], "seed": [0, 1, 2]}
    cells = [("oisd", s, "finished", None, {"method.layers": layers}) for layers in ([1], [2]) for s in (0, 1, 2)]
    root = make_grid(tmp_path / "g", cells, axes=axes, name="layers")
    ref = make_grid(tmp_path / "ref", [("grpo", s, "finished") for s in (0, 1, 2)],
                    axes={"seed": [0, 1, 2]}, name="reference")
    manifest = json.loads((ref / "grid.json").read_text())
    for cell in manifest["cells"]:
        cell["run_id"] = "b" + cell["run_id"]
    (ref / "grid.json").write_text(json.dumps(manifest))

    assert main(["collect", str(root), "--baseline-grid", str(ref)]) == 0
    paired = pd.read_parquet(root / "paired.parquet")
    greedy = paired[paired["metric"] == "greedy_acc"].sort_values("method.layers")
    # oisd greedy 0.3, 0.6, 0.6 against grpo 0.2, 0.4, 0.6 by seed, for each layer alike
    assert greedy[["method.layers", "n_pairs"]].values.tolist() == [["1", 3], ["2", 3]]
    assert greedy["mean_diff"].tolist() == pytest.approx([0.1, 0.1])
    agg = pd.read_parquet(root / "aggregate.parquet")
    base = one(agg, method="grpo", metric="greedy_acc")
    assert base["mean"] == pytest.approx(0.4) and base["n_seeds"] == 3 and pd.isna(base["method.layers"])
    meta = json.loads((root / "collect.json").read_text())
    assert meta["baseline_run_ids"] == ["b000000000000", "b000000000001", "b000000000002"]
    assert meta["baseline_grid"] == str(ref)
    assert len(meta["run_ids"]) == 9

    # a baseline grid without grpo runs, or one sharing runs with this grid, is refused in one line
    capsys.readouterr()
    assert main(["collect", str(root), "--baseline-grid", str(root)]) == 2
    assert capsys.readouterr().err.startswith("error: --baseline-grid: ")
    with pytest.raises(C.ConfigError, match="shares runs"):
        C.collect(ref, baseline_grid=ref)


def test_duplicate_rows_are_refused(tmp_path):
    root = make_grid(tmp_path / "g", HAND[:2])
    manifest = json.loads((root / "grid.json").read_text())
    manifest["cells"].append(manifest["cells"][0])
    (root / "grid.json").write_text(json.dumps(manifest))
    with pytest.raises(AssertionError, match="duplicate results rows"):
        C.collect(root)


def test_t_quantiles():
    assert C.t_quantile(1) == pytest.approx(12.7062047, abs=1e-6)
    assert C.t_quantile(2) == pytest.approx(T2, abs=1e-6)
    assert C.t_quantile(30) == pytest.approx(2.0422725, abs=1e-6)
    assert C.t_quantile(40) == pytest.approx(2.0210754, abs=1e-5)
    assert C.t_quantile(120) == pytest.approx(1.9799304, abs=1e-5)
    assert math.isnan(C.t_quantile(0))
    stats = C.mean_ci([1.0, 2.0])
    assert stats["ci95_high"] - stats["mean"] == pytest.approx(12.7062047 * math.sqrt(0.5) / math.sqrt(2))
