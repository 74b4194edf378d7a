"""Report figures from run and grid frames (see `runs.py`); each function returns a Figure.

Sizes follow paper columns (3.3 in single, 7 in double), the palette is seaborn's `colorblind`
with a fixed colour per method, and every interval is a 95% t-interval across seeds (`mean_ci`).
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from functools import wraps
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.patches import Rectangle

from .tables import (
    METHOD_ORDER,
    mean_ci,
    method_label,
    metric_label,
    ordered,
    row_keys,
    row_label,
    scale_of,
    select_rows,
    sorted_rows,
)

SINGLE, DOUBLE = 3.3, 7.0
STYLE = {"font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "xtick.labelsize": 7,
         "ytick.labelsize": 7, "legend.fontsize": 7, "figure.dpi": 100, "axes.spines.top": False,
         "axes.spines.right": False, "pdf.fonttype": 42, "ps.fonttype": 42}
CURVE_LABELS = {"reward": "reward (fraction correct)", "loss/policy": "policy loss",
                "loss/think": "L_think (weighted JSD, nats)", "loss/attn": "L_attn (weighted JSD, nats)",
                "loss/total": "total loss", "entropy": "policy entropy (nats)",
                "completions/mean_length": "completion length (tokens)"}
LAYER_LABELS = {"lens_acc": "lens accuracy (fraction)", "agree_top1": "top-1 agreement with final",
                "kl": "KL(p_L || p_k) (nats)", "jsd": "JSD(p_L, p_k) (nats)", "entropy": "lens entropy (nats)",
                "attn_jsd": "attention JSD to final (nats)", "attn_cos": "attention cosine to final"}


def styled(fn):
    """Draw inside the report style without touching global matplotlib state."""
    @wraps(fn)
    def inner(*args, **kwargs):
        with plt.rc_context(STYLE):
            return fn(*args, **kwargs)
    return inner


def method_colors(methods: Sequence[str] = ()) -> dict[str, tuple]:
    """A fixed colour per method: the paper's methods first, then any others."""
    palette = sns.color_palette("colorblind", 10)
    names = [*METHOD_ORDER, *sorted(set(methods) - set(METHOD_ORDER))]
    return {m: palette[i % len(palette)] for i, m in enumerate(names)}


def _colors(labels: list[str], methods: list[str]) -> dict[str, tuple]:
    """Method colours when each label is a different method, else one palette colour per label."""
    if len(set(methods)) == len(methods):
        by_method = method_colors(methods)
        return {label: by_method[m] for label, m in zip(labels, methods, strict=True)}
    return dict(zip(labels, sns.color_palette("colorblind", len(labels)), strict=True))


def groups_of(frame: pd.DataFrame, by: str = "method") -> tuple[list, dict, dict]:
    """The values of column `by` in the paper's method order, with a colour and a label for each
    (`by="variant"` separates runs of one method that differ in another grid axis)."""
    if by == "method":
        values = ordered(frame["method"].unique())
        return values, method_colors(values), {v: method_label(v) for v in values}
    pairs = frame[["method", by]].drop_duplicates(by)
    rank = {m: i for i, m in enumerate(ordered(pairs["method"]))}
    pairs = pairs.assign(_r=pairs["method"].map(rank)).sort_values(["_r", by])
    values, methods = list(pairs[by]), list(pairs["method"])
    labels = {v: str(v) for v in values}
    colors = _colors([labels[v] for v in values], methods)
    return values, {v: colors[labels[v]] for v in values}, labels


def series_of(frame: pd.DataFrame) -> list[tuple[tuple, dict, str]]:
    """Rows of a collected table as plot series: (key, key as a dict, label), methods in order."""
    keys = row_keys(frame)
    out = []
    for key in sorted_rows(frame, keys):
        named = dict(zip(keys, key, strict=True))
        out.append((key, named, row_label(named)))
    return out


def save_figure(fig, out_dir: str | Path, name: str, dpi: int = 200) -> list[Path]:
    """Write `<out_dir>/<name>.png` and `.pdf`; returns both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.png", out / f"{name}.pdf"]
    for path in paths:
        fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return paths


def _byte_alphabet() -> dict[str, int]:
    """The inverse of GPT-2's byte-level BPE alphabet (`bytes_to_unicode`): character -> byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    return {**{chr(b): b for b in keep}, **{chr(256 + i): b for i, b in enumerate(extra)}}


_BYTES = _byte_alphabet()


def token_text(token: str) -> str:
    """The text of a byte-level BPE token (`Ġthe` -> ` the`, `âĢĻ` -> `’`); other tokens unchanged
    except SentencePiece's `▁` (a space)."""
    token = str(token)
    if token and all(ch in _BYTES for ch in token) and any(ord(ch) > 127 for ch in token):
        raw = bytes(_BYTES[ch] for ch in token)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:  # part of a multi-byte character, or not byte-level at all
            if any(ord(ch) > 255 for ch in token):
                return raw.decode("utf-8", errors="backslashreplace")
    return token.replace("▁", " ")


def show_token(token: str, width: int = 6) -> str:
    """A token as a short, visible, mathtext-safe label (spaces and newlines drawn as symbols)."""
    text = token_text(token).replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥")
    text = text if len(text) <= width else text[: width - 1] + "…"
    return text.replace("$", r"\$") or "∅"


def _band(ax, x, stats: pd.DataFrame, color, label: str) -> None:
    ax.plot(x, stats["mean"], color=color, lw=1.4, label=label)
    if stats["ci95_low"].notna().any():
        ax.fill_between(x, stats["ci95_low"], stats["ci95_high"], color=color, alpha=0.2, lw=0)


def _stats(frame: pd.DataFrame, by: str, value: str) -> pd.DataFrame:
    """mean_ci of `value` over runs at each `by` value."""
    rows = {k: mean_ci(g[value]) for k, g in frame.groupby(by)}
    return pd.DataFrame.from_dict(rows, orient="index").sort_index()


def _seed_note(frame: pd.DataFrame, group: str = "method", runs: str = "run_id") -> str:
    """Seeds per line: runs per group (and task), as one number or a range."""
    counts = frame.groupby([group, "task"] if "task" in frame else group)[runs].nunique()
    n = sorted(set(counts))
    return f"n = {n[0]} seed(s)" if len(n) == 1 else f"n = {min(n)}-{max(n)} seeds"


@styled
def bar_chart(aggregate: pd.DataFrame, metric: str = "avg_at_k", results: pd.DataFrame | None = None,
              width: float = DOUBLE):
    """Grouped bars: task groups, one bar per method (and other grid axis values), 95% CI error
    bars; seed values as dots when the tidy `results` table is given."""
    agg = aggregate[aggregate["metric"] == metric]
    tasks, series, s = sorted(agg["task"].unique()), series_of(agg), scale_of(metric)
    keys = row_keys(agg)
    colors = _colors([label for *_, label in series], [named["method"] for _, named, _ in series])
    fig, ax = plt.subplots(figsize=(width, 2.4))
    w = 0.8 / max(len(series), 1)
    for j, (key, _, label) in enumerate(series):
        sel = select_rows(agg, keys, key).set_index("task").reindex(tasks)
        x = np.arange(len(tasks)) + (j - (len(series) - 1) / 2) * w
        err = np.vstack([sel["mean"] - sel["ci95_low"], sel["ci95_high"] - sel["mean"]]) * s
        ax.bar(x, sel["mean"] * s, w * 0.9, yerr=np.nan_to_num(err), capsize=2, color=colors[label],
               label=label, error_kw={"lw": 0.8})
        if results is not None:
            pts = select_rows(results, keys, key, metric=metric)
            for i, task in enumerate(tasks):
                vals = pts[pts["task"] == task]["value"] * s
                ax.scatter(np.full(len(vals), x[i]), vals, s=6, color="black", zorder=3, lw=0)
    n = agg["n_seeds"].dropna().astype(int)
    n_text = f"n = {n.min()}" if n.min() == n.max() else f"n = {n.min()}-{n.max()}"
    ax.set_xticks(np.arange(len(tasks)), tasks)
    ax.set_xlabel("task")
    ax.set_ylabel(f"held-out {metric_label(metric)}" + (" (%)" if s == 100 else ""))
    ax.set_title(f"mean over seeds, error bars: 95% CI ({n_text} seeds per bar)"
                 + ("; dots: seeds" if results is not None else ""))
    ax.legend(ncols=min(len(series), 3), frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.25))
    return fig


@styled
def training_curves(metrics: pd.DataFrame, keys: Sequence[str] = ("reward", "loss/policy", "loss/think", "loss/attn"),
                    by: str = "method", smooth: int = 1, width: float = DOUBLE):
    """One panel per metric (rows: tasks), one line per value of column `by`: mean over seeds per
    step, band = 95% CI across seeds."""
    keys = [k for k in keys if k in metrics.columns and metrics[k].notna().any()]
    tasks = sorted(metrics["task"].unique())
    groups, colors, labels = groups_of(metrics, by)
    fig, axes = plt.subplots(len(tasks), len(keys), figsize=(width, 1.9 * len(tasks) + 0.5), squeeze=False)
    for r, task in enumerate(tasks):
        for c, key in enumerate(keys):
            ax = axes[r, c]
            for group in groups:
                sel = metrics[(metrics["task"] == task) & (metrics[by] == group)][["run_id", "step", key]].dropna()
                if sel.empty:
                    continue
                if smooth > 1:
                    sel = sel.assign(**{key: sel.groupby("run_id")[key].transform(
                        lambda v: v.rolling(smooth, min_periods=1).mean())})
                stats = _stats(sel, "step", key)
                _band(ax, stats.index, stats, colors[group], labels[group])
            ax.set_xlabel("RL step")
            ax.set_ylabel(CURVE_LABELS.get(key, key))
            ax.set_title(f"{task}: {key}")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncols=min(len(labels), 5), frameon=False,
               bbox_to_anchor=(0.5, -0.02))
    fig.suptitle(f"line: mean over seeds, band: 95% CI ({_seed_note(metrics, by)})"
                 + (f", rolling mean of {smooth} steps" if smooth > 1 else ""))
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


@styled
def forest_plot(paired: pd.DataFrame, metric: str = "avg_at_k", width: float = SINGLE):
    """Paired difference to GRPO (same task and seed), one row per task x method (and other grid
    axis values), with 95% CI."""
    sel = paired[(paired["metric"] == metric) & (paired["method"] != "grpo")]
    keys, series, s = row_keys(sel), series_of(sel), scale_of(metric)
    colors = _colors([label for *_, label in series], [named["method"] for _, named, _ in series])
    rows = [(t, key, label) for t in sorted(sel["task"].unique()) for key, _, label in series
            if not select_rows(sel, keys, key, task=t).empty]
    fig, ax = plt.subplots(figsize=(width, 0.28 * len(rows) + 1.0))
    for i, (task, key, label) in enumerate(rows):
        r = select_rows(sel, keys, key, task=task).iloc[0]
        y = len(rows) - 1 - i
        if pd.notna(r["ci95_low"]):
            ax.plot([r["ci95_low"] * s, r["ci95_high"] * s], [y, y], color=colors[label], lw=1.5)
        ax.plot(r["mean_diff"] * s, y, "o", color=colors[label], ms=4)
        ax.annotate(f"n={int(r['n_pairs'])}", (1.0, y), xycoords=("axes fraction", "data"), xytext=(3, 0),
                    textcoords="offset points", va="center", fontsize=6)
    ax.axvline(0, color="0.4", lw=0.8, ls="--")
    ax.set_yticks(range(len(rows)), [f"{t} · {label}" for t, _, label in reversed(rows)])
    unit = " (percentage points)" if s == 100 else ""
    ax.set_xlabel(f"Δ {metric_label(metric)} vs GRPO{unit}")
    ax.set_ylabel("task · method")
    ax.set_title("paired difference, mean and 95% CI over seed pairs")
    return fig


def final_rows(diagnostics: pd.DataFrame, split: str = "all", step: int | None = None) -> pd.DataFrame:
    """Diagnostics rows of one split at each run's last (or the given) step, empty splits dropped."""
    d = diagnostics[(diagnostics["split"] == split) & (diagnostics["tokens"] > 0)]
    if step is not None:
        return d[d["step"] == step]
    last = d.groupby("run_id")["step"].transform("max")
    return d[d["step"] == last]


def _require(d: pd.DataFrame, methods: Sequence[str] | None, split: str) -> pd.DataFrame:
    if d.empty:
        raise ValueError(f"no diagnostics rows for {list(methods or ['any method'])} in split {split!r} "
                         "(a split with no tokens at a step is skipped)")
    return d


@styled
def layer_lines(diagnostics: pd.DataFrame, metrics: Sequence[str] = ("lens_acc", "agree_top1", "kl"),
                methods: Sequence[str] | None = ("grpo", "oisd"), split: str = "all", step: int | None = None,
                student_layers: Sequence[int] = (), by: str = "method", width: float = DOUBLE):
    """Per-layer metrics at the final step: mean over seeds with a 95% CI band, one line per value
    of column `by` among `methods` (None: all); dotted verticals mark the student layers."""
    d = final_rows(diagnostics, split, step)
    d = _require(d if methods is None else d[d[by].isin(methods)], methods, split)
    groups, colors, labels = groups_of(d, by)
    fig, axes = plt.subplots(1, len(metrics), figsize=(width, 2.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        for group in groups:
            sel = d[d[by] == group][["run_id", "layer", metric]].dropna()
            if not sel.empty:
                stats = _stats(sel, "layer", metric)
                _band(ax, stats.index, stats, colors[group], labels[group])
                ax.plot(stats.index, stats["mean"], "o", color=colors[group], ms=2.5)
        for layer in student_layers:
            ax.axvline(layer, color="0.5", ls=":", lw=0.8)
        ax.set_xlabel("layer k (0 = embeddings)")
        ax.set_ylabel(LAYER_LABELS.get(metric, metric))
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncols=min(len(labels), 5), frameon=False)
    when = "final step" if step is None else f"step {step}"
    fig.suptitle(f"logit lens per layer at the {when} (split {split!r}; band: 95% CI, {_seed_note(d, by)})"
                 + ("; dotted: student layer" if len(student_layers) else ""))
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig


@styled
def layer_heatmaps(diagnostics: pd.DataFrame, metrics: Sequence[str] = ("lens_acc", "agree_top1", "kl"),
                   methods: Sequence[str] | None = ("grpo", "oisd"), split: str = "all", by: str = "method",
                   difference: bool = True, width: float = DOUBLE):
    """Layer x step heatmaps (mean over seeds), one column per value of column `by` among `methods`
    (None: all), a shared colour scale per metric row; with two columns, a third shows the second
    minus the first."""
    d = diagnostics[(diagnostics["split"] == split) & (diagnostics["tokens"] > 0)]
    d = _require(d if methods is None else d[d[by].isin(methods)], methods, split)
    methods, _, labels = groups_of(d, by)
    diff = difference and len(methods) == 2
    cols = len(methods) + diff
    fig, axes = plt.subplots(len(metrics), cols, figsize=(width, 1.9 * len(metrics) + 0.3),
                             squeeze=False, sharex=True, sharey=True, layout="constrained")
    for r, metric in enumerate(metrics):
        grids = {m: d[d[by] == m].pivot_table(index="layer", columns="step", values=metric, aggfunc="mean")
                 for m in methods}
        lo = min(np.nanmin(g.values) for g in grids.values())
        hi = max(np.nanmax(g.values) for g in grids.values())
        for c, method in enumerate(methods):
            mesh = _heat(axes[r, c], grids[method], "viridis", lo, hi)
            axes[r, c].set_title(_wrap(labels[method]) if r == 0 else "")
        fig.colorbar(mesh, ax=list(axes[r, : len(methods)]), label=LAYER_LABELS.get(metric, metric), shrink=0.9)
        if diff:
            delta = grids[methods[1]] - grids[methods[0]]
            lim = max(np.nanmax(np.abs(delta.values)), 1e-12)
            mesh = _heat(axes[r, -1], delta, "RdBu_r", -lim, lim)
            axes[r, -1].set_title(_wrap(f"{labels[methods[1]]} − {labels[methods[0]]}") if r == 0 else "")
            fig.colorbar(mesh, ax=axes[r, -1], label=f"Δ {metric}", shrink=0.9)
        for c in range(cols):
            axes[r, c].set_xlabel("RL step" if r == len(metrics) - 1 else "")
            axes[r, c].set_ylabel(f"{metric}\nlayer k" if c == 0 else "")
    fig.suptitle(f"per-layer diagnostics over training (split {split!r}, mean over seeds)")
    return fig


def _wrap(text: str, width: int = 28) -> str:
    return textwrap.fill(text, width)


def _heat(ax, grid: pd.DataFrame, cmap: str, vmin: float, vmax: float):
    return ax.pcolormesh(grid.columns, grid.index, grid.values, shading="nearest", cmap=cmap, vmin=vmin, vmax=vmax)


def _token_ticks(ax, positions, labels: list[str], fontsize: float | None = None) -> None:
    """x tick labels for tokens: single characters upright (unless crowded), longer tokens vertical."""
    ax.set_xticks(list(positions), labels, fontsize=fontsize)
    for tick, text in zip(ax.get_xticklabels(), labels, strict=True):
        tick.set_rotation(0 if len(text) <= 2 and len(labels) <= 30 else 90)


def _trajectory_size(n_layers: int, n_pos: int) -> tuple[float, float]:
    return max(SINGLE, 0.42 * n_pos + 1.4), 0.24 * n_layers + 1.3


@styled
def prediction_trajectory(rollout: dict, max_positions: int = 24, layers: Sequence[int] | None = None,
                          title: str | None = None):
    """Layer x completion position grid, coloured by the lens's top-1 probability and annotated with
    the top-1 token (bold where it is the token actually sampled), as tuned-lens draws it."""
    prob = np.asarray(rollout["top_prob"], dtype=float)[:, :max_positions]
    top = [row[:max_positions] for row in rollout["top_token"]]
    tokens = rollout["tokens"][:max_positions]
    layers = list(range(prob.shape[0])) if layers is None else list(layers)
    prob, top = prob[layers], [top[k] for k in layers]
    fig, ax = plt.subplots(figsize=_trajectory_size(len(layers), prob.shape[1]))
    im = ax.imshow(prob, cmap="Blues", vmin=0, vmax=1, aspect="auto", origin="lower", interpolation="nearest")
    for i, row in enumerate(top):
        for j, tok in enumerate(row):
            ax.text(j, i, show_token(tok, 5), ha="center", va="center", fontsize=5.5,
                    color="white" if prob[i, j] > 0.6 else "black",
                    weight="bold" if tok == tokens[j] else "normal")
    _token_ticks(ax, range(len(tokens)), [show_token(t) for t in tokens])
    last = prob.shape[0] - 1
    ax.set_yticks(range(len(layers)), [f"{k} (emb.)" if k == 0 else f"{k} (final)" if i == last else str(k)
                                       for i, k in enumerate(layers)])
    for k in rollout.get("student_layers", []):
        if k in layers:
            i = layers.index(k)
            ax.add_patch(Rectangle((-0.5, i - 0.5), len(tokens), 1, fill=False, ec="#d55e00", lw=1.2))
    ax.set_xlabel("completion token sampled at this position (bold cell: lens top-1 matches it)")
    ax.set_ylabel("layer k" + (" (orange: student)" if rollout.get("student_layers") else ""))
    fig.colorbar(im, ax=ax, label="top-1 lens probability", shrink=0.8, pad=0.02)
    adv = rollout.get("advantage")
    ax.set_title(title or f"logit-lens trajectory, prompt {show_token(rollout.get('prompt', ''), 40)!r}"
                 + (f", advantage {adv:+.2f}" if adv is not None else ""))
    return fig


def _with_bad(name: str, color: str = "0.9"):
    return plt.get_cmap(name).with_extremes(bad=color)


def _attention_layers(rollout: dict, student: int | None) -> tuple[str, str]:
    keys = sorted(rollout["attention"], key=lambda k: int(k[1:]))
    final = keys[-1]
    if student is None:
        picks = [f"L{k}" for k in rollout.get("student_layers", []) if f"L{k}" in keys and f"L{k}" != final]
        student_key = picks[0] if picks else keys[0]
    else:
        student_key = f"L{student}"
    return student_key, final


@styled
def attention_maps(rollout: dict, student_layer: int | None = None, max_positions: int = 24,
                   difference: bool = True, width: float = DOUBLE):
    """Head-mean attention of the student layer and of the final layer side by side (completion
    queries x context keys, shared colour scale), and their difference."""
    s_key, f_key = _attention_layers(rollout, student_layer)
    ctx = rollout["context_tokens"]
    n_ctx = len(ctx) - len(rollout["tokens"])
    maps = [np.asarray(rollout["attention"][k], dtype=float)[:max_positions] for k in (s_key, f_key)]
    n_q = maps[0].shape[0]
    keys = maps[0].shape[1] if max_positions is None else min(maps[0].shape[1], n_ctx + n_q)
    causal = np.arange(keys)[None, :] > n_ctx - 1 + np.arange(n_q)[:, None]  # keys a query cannot see
    maps = [np.ma.masked_array(m[:, :keys], causal) for m in maps]
    panels = 3 if difference else 2
    fig, axes = plt.subplots(1, panels, figsize=(width, max(2.2, 0.16 * n_q + 1.4)), sharey=True,
                             layout="constrained")
    vmax = max(m.max() for m in maps)
    queries = [f"→{show_token(t)}" for t in rollout["tokens"][:n_q]]
    for ax, m, key, name in zip(axes[:2], maps, (s_key, f_key), ("student", "final"), strict=True):
        im = ax.imshow(m, cmap=_with_bad("viridis"), vmin=0, vmax=vmax, aspect="auto", interpolation="nearest")
        ax.set_title(f"{name} layer {key[1:]}")
    fig.colorbar(im, ax=list(axes[:2]), label="attention probability (head mean)", shrink=0.9, pad=0.02)
    if difference:
        diff = maps[0] - maps[1]
        lim = max(abs(diff).max(), 1e-9)
        im = axes[2].imshow(diff, cmap=_with_bad("RdBu_r"), vmin=-lim, vmax=lim, aspect="auto",
                            interpolation="nearest")
        axes[2].set_title("student − final")
        fig.colorbar(im, ax=axes[2], label="difference", shrink=0.9, pad=0.02)
    for ax in axes:
        step = max(1, keys // 30)
        _token_ticks(ax, range(0, keys, step), [show_token(t, 4) for t in ctx[:keys:step]], fontsize=5)
        ax.axvline(n_ctx - 0.5, color="0.3", lw=0.6, ls="--")
    fig.supxlabel("key token (prompt | completion, split by the dashed line; grey: not visible)", fontsize=8)
    axes[0].set_yticks(range(n_q), queries, fontsize=5)
    axes[0].set_ylabel("query position (token it predicts)")
    return fig


__all__ = ["bar_chart", "training_curves", "forest_plot", "layer_lines", "layer_heatmaps",
           "prediction_trajectory", "attention_maps", "save_figure", "method_colors", "show_token", "final_rows"]
