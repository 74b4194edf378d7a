"""The gradient view of a grid: what each loss term contributed to the update, per variant.

Reads the `grad/*` columns that training logs on logging steps (`oisd_lab.gradient_view`) from a
grid's metrics table: a table with one row per variant (method and other axis values), beside
its held-out accuracy, and a figure of each alignment channel's gradient norm over the policy
gradient's over training. That norm ratio can exceed 1 and is not the term's fraction of the
update; the AdamW-preconditioned ratio and cosine and the cosine across gradient-view steps are
read as in docs/oisd-method.md, "Reading the gradient view". Metrics logged under the old name
`share` are read as `norm_ratio` (`runs.current_metric_names`).
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import pandas as pd

from .runs import current_metric_names

GRADIENT_COLUMNS = {
    "grad/think/norm_ratio": "think norm ratio",
    "grad/attn/norm_ratio": "attn norm ratio",
    "grad/think/cos_policy": "think cos",
    "grad/attn/cos_policy": "attn cos",
    "grad/think/adam_norm_ratio": "think Adam ratio",
    "grad/attn/adam_norm_ratio": "attn Adam ratio",
    "grad/think/adam_cos_policy": "think Adam cos",
    "grad/attn/adam_cos_policy": "attn Adam cos",
    "grad/policy/cos_prev": "policy cos prev",
    "grad/think/cos_prev": "think cos prev",
    "grad/attn/cos_prev": "attn cos prev",
    "grad/policy/norm": "policy norm",
    "grad/think/div_pos": "think JSD A>0",
    "grad/think/div_neg": "think JSD A<0",
    "grad/attn/div_pos": "attn JSD A>0",
    "grad/attn/div_neg": "attn JSD A<0",
    "grad/cov_adv_length": "cov(A, len)",
    "grad/frac_zero_adv_groups": "zero-A groups",
}
"""Metric column -> table header, in table order."""

ACCURACY_COLUMNS = {"avg_at_k": "Avg@K %", "greedy_acc": "greedy %"}


def has_gradient_view(metrics: pd.DataFrame) -> bool:
    return not metrics.empty and "grad/policy/norm" in metrics


def gradient_summary(metrics: pd.DataFrame, by: str = "variant") -> pd.DataFrame:
    """Mean over a run's logging steps, then mean and std over runs, per `by` group.

    metrics: a grid's metrics table (`GridData.metrics`). Returns a frame indexed by group with
    columns (column, "mean" | "std"), plus ("view cost", ...): the gradient view's seconds as a
    fraction of the rest of the step's forward and backward on the same logging steps.
    """
    rows = current_metric_names(metrics[metrics["grad/policy/norm"].notna()]).copy()
    rows["view cost"] = rows["time/gradient_view"] / (rows["time/forward_backward"] - rows["time/gradient_view"])
    cols = [c for c in GRADIENT_COLUMNS if c in rows] + ["view cost"]
    per_run = rows.groupby([by, "run_id"])[cols].mean()
    return per_run.groupby(level=0).agg(["mean", "std"])


def _cell(mean: float, std: float, digits: int) -> str:
    if pd.isna(mean):
        return ""
    return f"{mean:.{digits}g}" if pd.isna(std) else f"{mean:.{digits}g} ± {std:.2g}"


def gradient_table(metrics: pd.DataFrame, evals: pd.DataFrame | None = None, by: str = "variant",
                   digits: int = 3) -> pd.DataFrame:
    """Display table: one row per group, "mean ± std over runs" of each gradient-view column, and
    (from a grid's `eval` frame) the held-out accuracies after RL in %, mean over runs."""
    summary = gradient_summary(metrics, by)
    table = pd.DataFrame(index=summary.index)
    if evals is not None and not evals.empty:
        for col, label in ACCURACY_COLUMNS.items():
            if col in evals:
                table[label] = (evals.groupby(by)[col].mean() * 100).round(1).reindex(table.index)
    for col in dict.fromkeys(c for c, _ in summary.columns):
        label = GRADIENT_COLUMNS.get(col, col)
        table[label] = [_cell(m, s, digits) for m, s in zip(summary[(col, "mean")], summary[(col, "std")],
                                                            strict=True)]
    table.index.name = by
    return table


def gradient_norm_ratios(metrics: pd.DataFrame, by: str = "variant",
                         channels: Sequence[str] = ("think", "attn"), width: float = 7.0):
    """Each alignment channel's gradient norm over the policy gradient's (`norm_ratio`, a ratio of
    norms, not a fraction of the update), per logging step (mean over runs), one line per group,
    log scale; dashed, where logged, the same ratio after AdamW's preconditioning."""
    panels = [(f"{c}: |g| / |g_policy| (dashed: AdamW)", f"grad/{c}/norm_ratio", f"grad/{c}/adam_norm_ratio")
              for c in channels]
    return _per_step(metrics, by, panels, width, yscale="log")


def has_cos_prev(metrics: pd.DataFrame) -> bool:
    return has_gradient_view(metrics) and "grad/policy/cos_prev" in metrics


def gradient_cos_prev(metrics: pd.DataFrame, by: str = "variant",
                      terms: Sequence[str] = ("policy", "think", "attn"), width: float = 9.0):
    """Each term's cosine between its gradient on a logging step and on the previous one
    (`cos_prev`), per logging step (mean over runs), one line per group: near 1 a term pushes the
    same way step after step, near 0 it turns."""
    panels = [(f"{t}: cos(g, g on the previous view step)", f"grad/{t}/cos_prev", None) for t in terms]
    return _per_step(metrics, by, panels, width, ylim=(-1.05, 1.05))


def _per_step(metrics: pd.DataFrame, by: str, panels: Sequence[tuple[str, str, str | None]], width: float,
              yscale: str = "linear", ylim: tuple[float, float] | None = None):
    """One panel per (title, column, dashed column or None): the column's mean over runs per
    logging step, one line per group (the dashed column in the same colour)."""
    rows = current_metric_names(metrics[metrics["grad/policy/norm"].notna()])
    fig, axes = plt.subplots(1, len(panels), figsize=(width, width * 0.4 * 2 / len(panels)), squeeze=False)
    for ax, (title, col, dashed) in zip(axes[0], panels, strict=True):
        if col in rows:
            for group, frame in rows.dropna(subset=[col]).groupby(by):
                curve = frame.groupby("step")[col].mean()
                (line,) = ax.plot(curve.index, curve.values, marker="o", ms=3, label=str(group))
                if dashed in frame and frame[dashed].notna().any():
                    other = frame.groupby("step")[dashed].mean().dropna()
                    ax.plot(other.index, other.values, ls="--", color=line.get_color(), label="_nolegend_")
        ax.set(title=title, xlabel="step", yscale=yscale)
        ax.title.set_fontsize(8)
        if ylim:
            ax.set_ylim(*ylim)
            ax.axhline(0.0, color="0.6", lw=0.6)
    lines = {label: h for ax in axes[0] for h, label in zip(*ax.get_legend_handles_labels(), strict=True)}
    if lines:
        fig.legend(list(lines.values()), list(lines), fontsize=6, loc="upper center",
                   bbox_to_anchor=(0.5, -0.02), ncol=3)
    fig.tight_layout()
    return fig
