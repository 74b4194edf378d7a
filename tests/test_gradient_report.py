"""The gradient view end to end: a training run logs it on its logging steps, and the report shows
it per method with the numbers of the metrics table."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from conftest import tiny_overrides
from test_analysis import write_run

from oisd_lab.analysis import gradients, report
from oisd_lab.analysis.runs import current_metric_names, load_grid
from oisd_lab.collect import collect
from oisd_lab.config import compose
from oisd_lab.train import train

RATIOS = {("grpo", 0): None, ("grpo", 1): None, ("oisd", 0): (0.02, 0.04), ("oisd", 1): (0.06, 0.08)}
"""(method, seed) -> think norm ratio at logging steps 1 and 3 (None: GRPO has no think term). Seed 0
logs it under its old name `share`, as the committed reports' runs did; seed 1 as `norm_ratio`."""


def _grad_rows(method: str, seed: int) -> list[dict]:
    rows = []
    for i, step in enumerate((1, 2, 3)):
        row = {"step": step, "reward": 0.1 * step, "loss/policy": -0.1, "time/forward_backward": 2.0}
        if step != 2:  # logging steps 1 and 3
            row.update({"grad/policy/norm": 0.5 + seed, "grad/frac_zero_adv_groups": 0.25,
                        "grad/cov_adv_length": -1.0, "time/gradient_view": 0.5})
            if RATIOS[(method, seed)]:
                name = "share" if seed == 0 else "norm_ratio"
                row.update({f"grad/think/{name}": RATIOS[(method, seed)][i // 2], "grad/think/cos_policy": 0.1})
            if seed == 1 and step == 3:  # logged since the AdamW view and cos_prev: from the 2nd view step
                row.update({"grad/policy/cos_prev": 0.2, **({"grad/think/cos_prev": 0.9, "grad/think/adam_norm_ratio":
                                                              0.5} if method == "oisd" else {})})
        rows.append(row)
    return rows


@pytest.fixture()
def view_grid(tmp_path):
    root, cells = tmp_path / "grid", []
    for (method, seed) in RATIOS:
        cell = {"index": len(cells), "id": f"{method}-s{seed}", "run_id": f"{method}{seed}", "method": method,
                "task": "arith", "seed": seed, "axes": {"method": method, "seed": seed}}
        run = write_run(root / "cells" / cell["id"], method, "arith", seed, 0.5)
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _grad_rows(method, seed)))
        cells.append(cell)
    (root / "grid.json").write_text(json.dumps({"name": "view", "cells": cells}))
    collect(root)
    return root


def test_gradient_summary_means_steps_then_runs(view_grid):
    grid = load_grid(view_grid)
    summary = gradients.gradient_summary(grid.metrics, by="method")
    # oisd: run means 0.03 (logged as `share`) and 0.07 -> mean 0.05, std 0.02 * sqrt(2)
    assert summary.loc["oisd", ("grad/think/norm_ratio", "mean")] == pytest.approx(0.05)
    assert summary.loc["oisd", ("grad/think/norm_ratio", "std")] == pytest.approx(0.04 / 2**0.5)
    assert pd.isna(summary.loc["grpo", ("grad/think/norm_ratio", "mean")])
    assert "grad/think/share" not in grid.metrics and "grad/think/share" not in summary
    assert summary.loc["grpo", ("grad/policy/norm", "mean")] == pytest.approx(1.0)
    assert summary.loc["grpo", ("view cost", "mean")] == pytest.approx(0.5 / 1.5)
    table = gradients.gradient_table(grid.metrics, grid.eval, by="method")
    assert table.loc["oisd", "think norm ratio"] == "0.05 ± 0.028" and table.loc["grpo", "think norm ratio"] == ""
    assert table.loc["oisd", "Avg@K %"] == 25.0
    # the newer views: mean over the runs that logged them (one here, so no std)
    assert table.loc["oisd", "think Adam ratio"] == "0.5" and table.loc["oisd", "think cos prev"] == "0.9"
    assert table.loc["grpo", "policy cos prev"] == "0.2"


def test_report_shows_the_gradient_view(view_grid, tmp_path, monkeypatch):
    monkeypatch.setattr(report, "_layer_specs", lambda grid, by: [])
    monkeypatch.setattr(report, "_snapshot_specs", lambda grid: [])
    out = report.write_report(view_grid, tmp_path / "report")
    table = (out / "tables" / "gradients.md").read_text()
    assert "0.05 ± 0.028" in table and (out / "tables" / "gradients.tex").is_file()
    assert "## Gradient view" in (out / "README.md").read_text()
    assert (out / "figures" / "gradient_norm_ratios.png").is_file()
    assert (out / "figures" / "gradient_cos_prev.png").is_file()
    assert "think norm ratio" in table and "share" not in table


def test_old_share_columns_read_as_norm_ratio():
    old = pd.DataFrame({"step": [1, 2], "grad/think/share": [0.1, 0.2], "grad/attn/share_reach": [0.3, None],
                        "grad/attn/norm_ratio_reach": [None, 0.5], "grad/think/cos_policy": [0.0, 0.1]})
    got = current_metric_names(old)
    assert set(got.columns) == {"step", "grad/think/norm_ratio", "grad/attn/norm_ratio_reach", "grad/think/cos_policy"}
    assert got["grad/think/norm_ratio"].tolist() == [0.1, 0.2]
    assert got["grad/attn/norm_ratio_reach"].tolist() == [0.3, 0.5]  # the new name keeps its own values
    assert current_metric_names(got) is got
    # the summary reads a frame that was never loaded from disk too
    frame = old.assign(**{"grad/policy/norm": 1.0, "time/gradient_view": 0.1, "time/forward_backward": 1.1,
                          "variant": "oisd", "run_id": "r"})
    assert gradients.gradient_summary(frame).loc["oisd", ("grad/think/norm_ratio", "mean")] == pytest.approx(0.15)


@pytest.mark.slow
def test_oisd_training_logs_the_gradient_view(tmp_path, cache_dir):
    run = train(compose(tiny_overrides(tmp_path / "oisd", "method=oisd", "method.weighting=uniform",
                                       "max_steps=2")))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]  # both are logging steps (every 2, and the last)
    for r in rows:
        for key in ("grad/policy/norm", "grad/think/norm_ratio", "grad/attn/cos_policy", "grad/think/div_zero",
                    "grad/cov_adv_length", "grad/frac_zero_adv_groups", "time/gradient_view"):
            assert key in r, key
        assert r["grad/think/norm"] > 0 and -1 <= r["grad/attn/cos_policy"] <= 1
        assert r["align_scale"] == 1.0
    # the first step has no optimizer state and no previous view step; the second has both
    later = ("grad/think/adam_norm_ratio", "grad/attn/adam_cos_policy", "grad/policy/cos_prev", "grad/think/cos_prev")
    assert not any(k in rows[0] for k in later) and all(k in rows[1] for k in later)
    assert rows[1]["grad/think/adam_norm_ratio"] > 0 and -1 <= rows[1]["grad/policy/cos_prev"] <= 1
