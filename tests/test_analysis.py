"""Analysis on hand-made data: loaders, tables (every number is the input's, CIs, seed counts),
figures (labels, legends, plotted values), the report, and the lens trajectory of a tiny model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402

from oisd_lab import analysis as A  # noqa: E402
from oisd_lab.analysis import figures as F  # noqa: E402
from oisd_lab.analysis import tables as T  # noqa: E402

LAYERS = 3  # hand-made runs have hidden_states 0..3


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


# ---------------------------------------------------------------------------- hand-made data


def agg_row(method, task, metric, mean, half, n=3):
    return {"method": method, "task": task, "metric": metric, "mean": mean, "std": half,
            "ci95_low": mean - half, "ci95_high": mean + half, "n_seeds": n}


def pair_row(method, task, metric, diff, low, high, n=3):
    return {"method": method, "task": task, "metric": metric, "baseline": "grpo", "mean_diff": diff,
            "std": 0.01, "ci95_low": low, "ci95_high": high, "n_pairs": n}


@pytest.fixture()
def aggregate():
    rows = []  # deliberately not in the paper's order
    for method, base in (("oisd", 0.50), ("grpo", 0.40), ("oisd_unsigned", 0.46), ("oisd_attn", 0.45),
                         ("oisd_logit", 0.44)):
        for task, shift in (("arith", 0.0), ("linear", 0.1)):
            rows.append(agg_row(method, task, "avg_at_k", base + shift, 0.0125))
            rows.append(agg_row(method, task, "greedy_acc", base + shift + 0.05, 0.02))
            rows.append(agg_row(method, task, "layer/kl/L02", 0.3, 0.1))
    return pd.DataFrame(rows)


@pytest.fixture()
def paired():
    return pd.DataFrame([
        pair_row("oisd", "arith", "avg_at_k", 0.10, 0.04, 0.16),       # excludes 0: better
        pair_row("oisd_logit", "arith", "avg_at_k", 0.04, -0.02, 0.10),  # includes 0
        pair_row("oisd_attn", "arith", "avg_at_k", -0.05, -0.08, -0.02),  # excludes 0: worse
        pair_row("oisd", "linear", "avg_at_k", 0.02, math.nan, math.nan, n=1),  # one pair
        pair_row("oisd", "arith", "greedy_acc", 0.03, -0.01, 0.07),
    ])


def write_run(root: Path, method: str, task: str, seed: int, acc: float, steps=(1, 2, 3)) -> Path:
    """A finished run directory as `train` writes it, with chosen numbers."""
    root.mkdir(parents=True)
    (root / "config.yaml").write_text(yaml.safe_dump({"method": {"name": method}, "task": {"name": task},
                                                      "seed": seed}))
    (root / "status.json").write_text(json.dumps({"status": "finished", "run_id": f"wb{seed}"}))
    ev = {"n": 16, "k": 2, "greedy_acc": acc, "avg_at_k": acc / 2, "avg@2": acc / 2}
    (root / "eval.json").write_text(json.dumps({"before": {**ev, "greedy_acc": 0.1, "avg_at_k": 0.05},
                                                "after": ev, "train_seconds": 5.0, "steps": steps[-1],
                                                "method": method, "task": task, "seed": seed}))
    rows = [{"step": s, "reward": acc * s / 3, "loss/policy": -0.1 * s, "loss/think": 0.01 * s,
             "loss/attn": 0.001 * s} for s in steps]
    (root / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 9, "rew')
    diag = []
    for s in steps:
        for layer in range(LAYERS + 1):
            base = {"step": s, "layer": layer, "lens_acc": acc * layer / LAYERS, "agree_top1": layer / LAYERS,
                    "kl": (LAYERS - layer) * 0.5, "jsd": 0.1, "entropy": 2.0}
            attn = {"attn_jsd": 0.01 * (LAYERS - layer), "attn_cos": 0.9} if layer else {}
            diag.append({**base, **attn, "split": "all", "tokens": 40, "attn_jsd_head": [0.1, 0.2]})
            diag.append({**base, **attn, "split": "neg", "tokens": 0, "lens_acc": 0.0})
    (root / "diagnostics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in diag))
    (root / "snapshots").mkdir()
    tokens, ctx = ["4", "2", "</s>"], ["Q", ":", "1", "+", "3", "4", "2", "</s>"]
    rollout = {"row": 0, "prompt": "Q:1+3", "tokens": tokens, "context_tokens": ctx,
               "top_token": [["4", "x", "</s>"]] * (LAYERS + 1),
               "top_prob": [[0.2 + 0.2 * k, 0.5, 0.9] for k in range(LAYERS + 1)],
               "attention": {f"L{k}": (np.tril(np.ones((3, 8)), 4) / np.arange(5, 8)[:, None]).tolist()
                             for k in (1, LAYERS)},
               "advantage": 0.8, "student_layers": [1]}
    (root / "snapshots" / f"step_{steps[-1]:06d}.json").write_text(
        json.dumps({"step": steps[-1], "rollouts": [rollout]}))
    return root


@pytest.fixture()
def grid_dir(tmp_path):
    """grpo and oisd x 2 seeds on `arith`, laid out like `oisd-lab grid`, collected by `collect`."""
    from oisd_lab.collect import collect

    root = tmp_path / "grid"
    accs = {("grpo", 0): 0.50, ("grpo", 1): 0.25, ("oisd", 0): 0.75, ("oisd", 1): 0.375}
    cells = []
    for (method, seed), acc in accs.items():
        cell = {"index": len(cells), "id": f"{method}-arith-s{seed}-abc{seed}", "run_id": f"{method}{seed}hash",
                "overrides": [f"method={method}", f"seed={seed}"], "axes": {"method": method, "seed": seed},
                "method": method, "task": "arith", "seed": seed}
        write_run(root / "cells" / cell["id"], method, "arith", seed, acc)
        cells.append(cell)
    (root / "grid.json").write_text(json.dumps({"name": "handmade", "axes": {"method": ["grpo", "oisd"],
                                                                              "seed": [0, 1]}, "cells": cells}))
    collect(root)
    return root


# ---------------------------------------------------------------------------- tables


def test_mean_ci_is_the_t_interval():
    stats = A.mean_ci([1.0, 2.0, 3.0, None, float("nan")])
    half = 4.302652730 / math.sqrt(3)  # t(0.975, df=2) * std 1 / sqrt(3)
    assert stats["n"] == 3 and stats["mean"] == 2.0 and stats["std"] == 1.0
    assert stats["ci95_low"] == pytest.approx(2.0 - half) and stats["ci95_high"] == pytest.approx(2.0 + half)
    assert math.isnan(A.mean_ci([5.0])["ci95_low"])


def test_method_task_table_shows_the_inputs_in_paper_order(aggregate):
    table = A.method_task_table(aggregate)
    assert list(table.index) == ["GRPO", "+ logit alignment only", "+ attention alignment only", "OISD (both)",
                                 "OISD, unsigned weighting"]
    assert list(table.columns) == ["arith Avg@K", "arith greedy acc.", "linear Avg@K", "linear greedy acc.",
                                   "n seeds"]
    assert table.loc["OISD (both)", "arith Avg@K"] == "50.0 ± 1.2"  # 0.50 ± 0.0125, in %
    assert table.loc["GRPO", "linear greedy acc."] == "55.0 ± 2.0"
    assert set(table["n seeds"]) == {"3"}


def test_seed_counts_per_task_when_they_differ(aggregate):
    agg = aggregate.copy()
    agg.loc[(agg["method"] == "grpo") & (agg["task"] == "linear"), "n_seeds"] = 2
    agg.loc[(agg["method"] == "oisd") & (agg["task"] == "arith") & (agg["metric"] == "avg_at_k"),
            ["ci95_low", "ci95_high"]] = math.nan
    table = A.method_task_table(agg)
    assert table.loc["GRPO", "n seeds"] == "3/2"
    assert table.loc["OISD (both)", "arith Avg@K"] == "50.0"  # no interval: the mean alone


def test_paired_table_and_honest_sentences(paired):
    table = A.paired_table(paired)
    assert table.loc["OISD (both)", "arith ΔAvg@K"] == "+10.0 [+4.0, +16.0]"
    assert table.loc["OISD (both)", "linear ΔAvg@K"] == "+2.0 –"
    assert table.loc["OISD (both)", "n pairs"] == "3/1"
    text = A.summary_sentences(paired)
    assert text[0].startswith("arith: + logit alignment only does not beat GRPO on Avg@K")
    assert "+4.0 points" in text[0] and "[-2.0, +10.0]" in text[0] and "includes 0" in text[0]
    assert text[1].startswith("arith: + attention alignment only is worse than GRPO")
    assert text[2] == ("arith: OISD (both) beats GRPO on Avg@K by +10.0 points (95% CI [+4.0, +16.0] over "
                       "3 paired seeds; the interval excludes 0).")
    assert text[3].startswith("linear: OISD (both)") and "no claim" in text[3]


def test_markdown_and_latex_writers(aggregate):
    table = A.method_task_table(aggregate)
    md = A.to_markdown(table, "caption")
    lines = md.strip().splitlines()
    assert lines[0] == "caption" and lines[2].startswith("| method | arith Avg@K |")
    assert len(lines) == 4 + len(table) and "| OISD (both) | 50.0 ± 1.2 |" in md
    tex = A.to_latex(table, "Accuracy in % (n_seeds)", label="tab:main")
    assert tex.startswith("\\begin{table}") and "\\toprule" in tex and "\\label{tab:main}" in tex
    assert "50.0 $\\pm$ 1.2" in tex and "in \\% (n\\_seeds)" in tex


def test_beside_paper_keeps_the_paper_numbers(aggregate, paired):
    table = A.beside_paper(aggregate, paired)
    assert table.loc["GRPO", "paper Qwen3-4B Avg@K"] == "55.08"
    assert table.loc["OISD (both)", "paper Δ vs GRPO"] == "+9.67"
    assert table.loc["OISD (both)", "ours arith Avg@K"] == "50.0 ± 1.2"
    assert table.loc["OISD (both)", "ours arith Δ vs GRPO"] == "+10.0"
    assert table.loc["OISD, unsigned weighting", "paper Qwen3-4B Avg@K"] == "–"


def test_aggregate_table_lists_scalar_metrics_only(aggregate):
    table = A.aggregate_table(aggregate)
    assert not table["metric"].str.startswith("layer/").any()
    assert len(table) == 5 * 2 * 2 and set(table["n seeds"]) == {"3"}


# ---------------------------------------------------------------------------- loaders


def test_load_run_reads_every_table(tmp_path):
    run = A.load_run(write_run(tmp_path / "r", "oisd", "arith", 1, 0.5))
    assert list(run.metrics["step"]) == [1, 2, 3]  # the torn last line is skipped
    assert len(run.diagnostics) == 3 * (LAYERS + 1) * 2
    assert run.info == {"run_id": "wb1", "method": "oisd", "task": "arith", "seed": 1}
    assert run.snapshot_steps == [3] and run.snapshot()["rollouts"][0]["student_layers"] == [1]


def test_load_grid_uses_the_manifest_and_the_collected_tables(grid_dir):
    grid = A.load_grid(grid_dir)
    assert grid.name == "handmade" and grid.collected and grid.results_dir == grid_dir
    assert sorted(grid.runs["run_id"]) == ["grpo0hash", "grpo1hash", "oisd0hash", "oisd1hash"]
    assert set(grid.metrics.columns) >= {"run_id", "cell", "method", "task", "seed", "reward"}
    assert set(grid.diagnostics["method"]) == {"grpo", "oisd"}
    row = grid.eval.set_index("run_id").loc["oisd1hash"]
    assert row["greedy_acc"] == 0.375 and row["greedy_acc_before"] == 0.1 and row["k"] == 2
    acc = grid.aggregate[(grid.aggregate["metric"] == "greedy_acc") & (grid.aggregate["method"] == "oisd")].iloc[0]
    assert acc["mean"] == pytest.approx(0.5625) and acc["n_seeds"] == 2
    table = A.method_task_table(grid.aggregate)
    assert table.loc["OISD (both)", "arith greedy acc."] == T.fmt_ci(acc["mean"], acc["ci95_low"], acc["ci95_high"],
                                                                    100.0, 1)
    assert table.loc["OISD (both)", "n seeds"] == "2"


# ---------------------------------------------------------------------------- figures


def test_bar_chart_heights_errors_labels(aggregate):
    fig = A.bar_chart(aggregate, "avg_at_k")
    ax = fig.axes[0]
    assert ax.get_xlabel() == "task" and ax.get_ylabel() == "held-out Avg@K (%)"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[0] == "GRPO" and labels[3] == "OISD (both)"
    heights = [p.get_height() for p in ax.patches]
    assert heights[:2] == pytest.approx([40.0, 50.0])  # GRPO on arith, linear
    assert "n = 3" in ax.get_title() and "95% CI" in ax.get_title()
    assert fig.get_size_inches()[0] == pytest.approx(7.0)


def test_training_curves_mean_line_and_seed_band(grid_dir):
    grid = A.load_grid(grid_dir)
    fig = A.training_curves(grid.metrics)
    assert len(fig.axes) == 4
    ax = fig.axes[0]
    assert ax.get_xlabel() == "RL step" and ax.get_ylabel() == "reward (fraction correct)"
    oisd = [line for line in ax.get_lines() if line.get_label() == "OISD (both)"][0]
    assert oisd.get_ydata()[-1] == pytest.approx((0.75 + 0.375) / 2)  # reward at step 3 = acc
    assert len(ax.collections) == 2  # one CI band per method
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["GRPO", "OISD (both)"]


def test_forest_plot(paired):
    fig = A.forest_plot(paired, "avg_at_k")
    ax = fig.axes[0]
    assert ax.get_xlabel() == "Δ Avg@K vs GRPO (percentage points)" and ax.get_ylabel() == "task · method"
    assert [t.get_text() for t in ax.get_yticklabels()][-1] == "arith · + logit alignment only"
    zero = [line for line in ax.get_lines() if list(line.get_xdata()) == [0, 0]]
    assert zero, "no reference line at 0"


def test_layer_lines_at_the_final_step_skip_empty_splits(grid_dir):
    grid = A.load_grid(grid_dir)
    fig = A.layer_lines(grid.diagnostics, student_layers=[1])
    ax = fig.axes[0]
    assert ax.get_xlabel() == "layer k (0 = embeddings)" and ax.get_ylabel() == "lens accuracy (fraction)"
    grpo = [line for line in ax.get_lines() if line.get_label() == "GRPO"][0]
    assert list(grpo.get_ydata()) == pytest.approx([0.375 * k / LAYERS for k in range(LAYERS + 1)])
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["GRPO", "OISD (both)"]
    assert "n = 2 seed(s)" in fig.texts[0].get_text()  # the suptitle
    with pytest.raises(ValueError, match="split 'neg'"):
        A.layer_lines(grid.diagnostics, split="neg")  # its rows all have tokens == 0


def test_layer_heatmaps_side_by_side(grid_dir):
    grid = A.load_grid(grid_dir)
    fig = A.layer_heatmaps(grid.diagnostics)
    panels, bars = fig.axes[:9], fig.axes[9:]  # 3 metrics x (GRPO, OISD, difference), then colour bars
    assert [ax.get_title() for ax in panels[:3]] == ["GRPO", "OISD (both)", "OISD (both) − GRPO"]
    assert [ax.get_ylabel() for ax in panels[::3]] == ["lens_acc\nlayer k", "agree_top1\nlayer k", "kl\nlayer k"]
    assert panels[-1].get_xlabel() == "RL step"
    bars = [ax.get_ylabel() for ax in bars]
    assert bars == ["lens accuracy (fraction)", "Δ lens_acc", "top-1 agreement with final", "Δ agree_top1",
                    "KL(p_L || p_k) (nats)", "Δ kl"]


def test_prediction_trajectory_and_attention_maps(grid_dir, tmp_path):
    rollout = A.load_grid(grid_dir).snapshot("oisd")["rollouts"][0]
    fig = A.prediction_trajectory(rollout)
    ax = fig.axes[0]
    assert len(ax.texts) == (LAYERS + 1) * 3
    assert sum(t.get_weight() == "bold" for t in ax.texts) == 2 * (LAYERS + 1)  # "4" and "</s>" match
    assert ax.get_ylabel().startswith("layer k") and "sampled" in ax.get_xlabel()
    assert [t.get_text() for t in ax.get_yticklabels()][-1] == f"{LAYERS} (final)"
    assert len(ax.patches) == 1  # the student layer's frame
    fig = A.attention_maps(rollout)
    assert [ax.get_title() for ax in fig.axes[:3]] == ["student layer 1", "final layer 3", "student − final"]
    image = fig.axes[0].get_images()[0].get_array()
    assert image.mask[0, 5] and not image.mask[0, 4]  # query 0 (the last prompt position) sees the prompt
    paths = A.save_figure(fig, tmp_path / "figs", "attention")
    assert [p.name for p in paths] == ["attention.png", "attention.pdf"] and all(p.stat().st_size for p in paths)


def test_show_token_is_visible_and_mathtext_safe():
    assert F.show_token("Ġthe") == "␣the" and F.show_token("\n") == "↵" and F.show_token("$") == r"\$"
    assert F.show_token("abcdefghij") == "abcde…" and F.show_token("âĢĻ") == "’" and F.show_token("é") == "é"
    assert F.show_token("▁Hello", 8) == "␣Hello"


# ---------------------------------------------------------------------------- report


def test_report_command_writes_figures_tables_readme(grid_dir, tmp_path, monkeypatch):
    from oisd_lab.analysis import report
    from oisd_lab.cli import main

    # the layer and snapshot figures are drawn above and in test_notebooks; here only their names
    names = [name for name, _ in report.figure_specs(A.load_grid(grid_dir))]
    assert names[-6:] == ["layers_arith", "heatmaps_arith", "trajectory_arith_grpo", "attention_arith_grpo",
                          "trajectory_arith_oisd", "attention_arith_oisd"]
    monkeypatch.setattr(report, "_layer_specs", lambda grid, by: [])
    monkeypatch.setattr(report, "_snapshot_specs", lambda grid: [])
    out = tmp_path / "report"
    assert main(["report", str(grid_dir), "--out", str(out)]) == 0
    grid = A.load_grid(grid_dir)
    assert (out / "tables" / "main.md").read_text() == A.to_markdown(
        A.method_task_table(grid.aggregate), (out / "tables" / "main.md").read_text().splitlines()[0])
    for name in ("main", "paired", "paper", "aggregate"):
        assert (out / "tables" / f"{name}.tex").read_text().startswith("\\begin{table}")
    copies = {p.name for p in (out / "tables").iterdir()}
    assert {"results.csv", "aggregate.csv", "paired.csv", "collect.json"} <= copies
    for name in ("bars_avg_at_k", "bars_greedy_acc", "paired_avg_at_k", "paired_greedy_acc", "curves"):
        assert (out / "figures" / f"{name}.png").is_file() and (out / "figures" / f"{name}.pdf").is_file()
    readme = (out / "README.md").read_text()
    assert f"- command: `oisd-lab report {grid_dir} --out {out}`" in readme
    assert all(run_id in readme for run_id in grid.runs["run_id"])
    assert "git commit (report): `" in readme and "- date: " in readme
    diff = grid.paired[(grid.paired["metric"] == "avg_at_k")].iloc[0]
    sentence = A.summary_sentences(grid.paired)[0]
    assert f"{diff['mean_diff'] * 100:+.1f} points" in sentence and sentence in readme


def test_report_into_the_folder_of_its_collected_tables(grid_dir, tmp_path, monkeypatch):
    """`--results OUT/tables`: the report writes its tables beside the collected ones and keeps them."""
    from oisd_lab.analysis import report
    from oisd_lab.collect import collect

    monkeypatch.setattr(report, "_layer_specs", lambda grid, by: [])
    monkeypatch.setattr(report, "_snapshot_specs", lambda grid: [])
    out = tmp_path / "report"
    collect(grid_dir, out / "tables")
    before = (out / "tables" / "paired.csv").read_text()
    report.write_report(grid_dir, out, results_dir=out / "tables")
    assert (out / "tables" / "paired.csv").read_text() == before
    assert (out / "tables" / "main.md").is_file() and (out / "README.md").is_file()


def test_report_collects_when_tables_are_missing(grid_dir, tmp_path):
    for path in grid_dir.glob("*.parquet"):
        path.unlink()
    for path in grid_dir.glob("*.csv"):
        path.unlink()
    grid = A.ensure_collected(grid_dir)
    assert grid.collected and (grid_dir / "aggregate.parquet").is_file()


# ---------------------------------------------------------------------------- lens trajectory


def test_lens_trajectory_of_a_tiny_model(tiny_model, char_tokenizer):
    out = A.lens_trajectory(tiny_model, char_tokenizer, "Q: 1+2\nA: ", max_new_tokens=5, chat=False)
    n = len(out["tokens"])
    assert 1 <= n <= 5 and len(out["top_token"]) == 7 and all(len(row) == n for row in out["top_prob"])
    assert out["top_token"][-1] == out["tokens"]  # greedy: the final layer's top-1 is the emitted token
    assert out["student_layers"] == [1] and set(out["attention"]) == {"L1", "L6"}
    assert len(out["attention"]["L6"]) == n and len(out["attention"]["L6"][0]) == len(out["context_tokens"])
    assert A.prediction_trajectory(out).axes[0].get_ylabel().startswith("layer k")
