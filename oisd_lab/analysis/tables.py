"""Paper-style tables from the collected `aggregate` and `paired` tables, as Markdown and LaTeX.

Every number shown is a value of the collected tables, only scaled (accuracies to %) and rounded.
`mean_ci` (the collector's own interval) is here for the seed bands of figures.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

from ..collect import POWER_COLUMNS
from ..collect import mean_ci as collect_mean_ci

METHOD_ORDER = ("grpo", "oisd_logit", "oisd_attn", "oisd", "oisd_unsigned")
METHOD_LABELS = {"grpo": "GRPO", "oisd_logit": "+ logit alignment only",
                 "oisd_attn": "+ attention alignment only", "oisd": "OISD (both)",
                 "oisd_unsigned": "OISD, unsigned weighting"}
METRIC_LABELS = {"avg_at_k": "Avg@K", "greedy_acc": "greedy acc.", "avg_at_k_before": "Avg@K before RL",
                 "greedy_acc_before": "greedy acc. before RL", "train_seconds": "train time (s)",
                 "reward_last10": "reward, last 10 steps"}
PERCENT = {"avg_at_k", "greedy_acc", "avg_at_k_before", "greedy_acc_before"}
STAT_COLUMNS = ("metric", "mean", "mean_diff", "std", "ci95_low", "ci95_high", "n_seeds", "n_pairs", "value",
                "step", "baseline", *POWER_COLUMNS)

# The paper's headline table (Qwen3-4B, Avg@K in %, arXiv 2605.29089); blanks are not reported.
PAPER_QWEN3_4B = pd.DataFrame(
    {"AIME24": [32.19, np.nan, np.nan, 47.29], "MATH500": [82.41, np.nan, np.nan, 90.99],
     "Avg (4 tasks)": [55.08, 61.67, 63.08, 64.75]},
    index=pd.Index(["grpo", "oisd_logit", "oisd_attn", "oisd"], name="method"))


def mean_ci(values: Iterable[float]) -> dict:
    """Mean, std (ddof 1), 95% t-interval and n of the non-missing values: `collect.mean_ci`, so
    figure bands and collected tables use one definition."""
    return collect_mean_ci([v for v in values if v is not None and not pd.isna(v)])


def ordered(methods: Iterable[str]) -> list[str]:
    """The paper's row order, unknown methods after it alphabetically."""
    methods = list(dict.fromkeys(methods))
    rank = {m: i for i, m in enumerate(METHOD_ORDER)}
    return sorted(methods, key=lambda m: (rank.get(m, len(rank)), m))


def method_label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


def metric_label(metric: str) -> str:
    return METRIC_LABELS.get(metric, metric)


def scale_of(metric: str) -> float:
    return 100.0 if metric in PERCENT else 1.0


def fmt(value: float, digits: int, sign: bool = False) -> str:
    return "–" if value is None or pd.isna(value) else f"{value:{'+' if sign else ''}.{digits}f}"


def fmt_ci(mean: float, low: float, high: float, scale: float = 1.0, digits: int = 1) -> str:
    """`mean ± half-width` of a symmetric interval, or the mean alone when there is none."""
    if pd.isna(low) or pd.isna(high):
        return fmt(mean * scale, digits)
    return f"{fmt(mean * scale, digits)} ± {fmt((high - low) / 2 * scale, digits)}"


def fmt_interval(low: float, high: float, scale: float = 1.0, digits: int = 1) -> str:
    if pd.isna(low) or pd.isna(high):
        return "–"
    return f"[{low * scale:+.{digits}f}, {high * scale:+.{digits}f}]"


def row_keys(frame: pd.DataFrame) -> list[str]:
    """The columns that identify a table row: method plus any grid axis (everything not a stat)."""
    other = [c for c in frame.columns if c not in (*STAT_COLUMNS, "method", "task", "grid", "baseline")]
    return ["method", *other]


def row_label(keys: dict) -> str:
    """`OISD (both)`, or with the other axis values: `OISD (both) (method.layers=2)`."""
    extra = ", ".join(f"{k}={v}" for k, v in keys.items() if k != "method" and not pd.isna(v))
    label = method_label(keys.get("method", ""))
    return f"{label} ({extra})" if extra else label


def sorted_rows(frame: pd.DataFrame, keys: list[str]) -> list[tuple]:
    """The distinct row keys of `frame`, methods in the paper's order, then by the other axes."""
    rows = frame[keys].drop_duplicates()
    rank = {m: i for i, m in enumerate(ordered(rows["method"]))}
    rows = rows.assign(_r=rows["method"].map(rank)).sort_values(["_r", *keys[1:]] if len(keys) > 1 else "_r")
    return [tuple(r) for r in rows[keys].itertuples(index=False)]


def select_rows(frame: pd.DataFrame, keys: list[str], key: tuple, **where) -> pd.DataFrame:
    """Rows of `frame` whose `keys` equal `key` (NaN matches NaN) and whose columns match `where`."""
    mask = pd.Series(True, index=frame.index)
    for k, v in (*zip(keys, key, strict=True), *where.items()):
        mask &= frame[k].isna() if pd.isna(v) else frame[k] == v
    return frame[mask]


def _seed_counts(values: list[int]) -> str:
    values = [int(v) for v in values if not pd.isna(v)]
    if not values:
        return "–"
    return str(values[0]) if len(set(values)) == 1 else "/".join(str(v) for v in values)


def method_task_table(aggregate: pd.DataFrame, metrics: Sequence[str] = ("avg_at_k", "greedy_acc"),
                      digits: int = 1) -> pd.DataFrame:
    """Rows: methods in the paper's order; columns: `<task> <metric>` cells `mean ± 95% CI
    half-width` (accuracies in %), and `n seeds` (one number, or one per task when they differ)."""
    agg = aggregate[aggregate["metric"].isin(metrics)]
    keys = row_keys(agg)
    tasks = sorted(agg["task"].unique())
    out = {}
    for key in sorted_rows(agg, keys):
        cells, seeds = {}, []
        for task in tasks:
            for metric in metrics:
                sel = select_rows(agg, keys, key, task=task, metric=metric)
                col = f"{task} {metric_label(metric)}"
                if sel.empty:
                    cells[col] = "–"
                    continue
                r = sel.iloc[0]
                cells[col] = fmt_ci(r["mean"], r["ci95_low"], r["ci95_high"], scale_of(metric), digits)
            task_rows = select_rows(agg, keys, key, task=task)
            seeds.append(task_rows["n_seeds"].max() if not task_rows.empty else np.nan)
        cells["n seeds"] = _seed_counts(seeds)
        out[row_label(dict(zip(keys, key, strict=True)))] = cells
    return pd.DataFrame.from_dict(out, orient="index").rename_axis("method")


def flagged_non_result(r: pd.Series) -> bool:
    """Whether a paired row is labelled a non-result (missing or unknown: no)."""
    value = r.get("non_result")
    return value is not None and not (isinstance(value, float) and pd.isna(value)) and bool(value)


def paired_cell(r: pd.Series, scale: float, digits: int) -> str:
    """`mean [95% CI], MDE80 x` of one paired comparison; a zero-variance comparison shows its flag
    instead of an interval, and a non-result (detectable effect above the reference's own gain)
    is marked `(non-result)`."""
    mean = f"{r['mean_diff'] * scale:+.{digits}f}"
    flag = r.get("flag")
    if isinstance(flag, str) and flag:
        return f"{mean} ({flag}, no interval)"
    text = f"{mean} {fmt_interval(r['ci95_low'], r['ci95_high'], scale, digits)}"
    if not pd.isna(r.get("mde80", np.nan)):
        text += f", MDE80 {r['mde80'] * scale:.{digits}f}"
    if flagged_non_result(r):
        text += " (non-result)"
    return text


def paired_table(paired: pd.DataFrame, metrics: Sequence[str] = ("avg_at_k", "greedy_acc"),
                 digits: int = 1) -> pd.DataFrame:
    """Method minus GRPO on the same task and seed: `mean [95% CI], MDE80 x` per task and metric
    (accuracies in percentage points; `paired_cell`), and the number of seed pairs."""
    sel = paired[paired["metric"].isin(metrics)]
    keys = row_keys(sel)
    tasks = sorted(sel["task"].unique())
    out = {}
    for key in sorted_rows(sel, keys):
        cells, pairs = {}, []
        for task in tasks:
            for metric in metrics:
                rows = select_rows(sel, keys, key, task=task, metric=metric)
                col = f"{task} Δ{metric_label(metric)}"
                if rows.empty:
                    cells[col] = "–"
                    continue
                cells[col] = paired_cell(rows.iloc[0], scale_of(metric), digits)
            task_rows = select_rows(sel, keys, key, task=task)
            pairs.append(task_rows["n_pairs"].max() if not task_rows.empty else np.nan)
        cells["n pairs"] = _seed_counts(pairs)
        out[row_label(dict(zip(keys, key, strict=True)))] = cells
    return pd.DataFrame.from_dict(out, orient="index").rename_axis("method vs GRPO")


def aggregate_table(aggregate: pd.DataFrame, digits: int = 4) -> pd.DataFrame:
    """Every scalar (non per-layer) metric, raw units: mean, std, 95% CI, n seeds."""
    agg = aggregate[~aggregate["metric"].astype(str).str.startswith("layer/")]
    keys = row_keys(agg)
    rows = []
    for key in sorted_rows(agg, keys):
        for _, r in select_rows(agg, keys, key).sort_values(["task", "metric"]).iterrows():
            label = row_label(dict(zip(keys, key, strict=True)))
            rows.append({"method": label, "task": r["task"], "metric": r["metric"],
                         "mean": fmt(r["mean"], digits), "std": fmt(r["std"], digits),
                         "95% CI": fmt_interval(r["ci95_low"], r["ci95_high"], 1.0, digits),
                         "n seeds": _seed_counts([r["n_seeds"]])})
    return pd.DataFrame(rows).set_index("method")


def beside_paper(aggregate: pd.DataFrame, paired: pd.DataFrame | None, metric: str = "avg_at_k",
                 digits: int = 1) -> pd.DataFrame:
    """Our Avg@K per task (and its difference to GRPO) next to the paper's Qwen3-4B average and
    the paper's difference to GRPO, in the paper's rows (plus our other variants)."""
    paper, scale = PAPER_QWEN3_4B["Avg (4 tasks)"], scale_of(metric)
    agg = aggregate[aggregate["metric"] == metric]
    pairs = None if paired is None else paired[paired["metric"] == metric]
    keys = row_keys(agg)
    ours = {key[0]: [] for key in sorted_rows(agg, keys)}
    for key in sorted_rows(agg, keys):
        ours[key[0]].append(key)
    out = {}
    for method in ordered([*PAPER_QWEN3_4B.index, *ours]):
        gain = paper.get(method, np.nan) - paper["grpo"]
        ref = {"paper Qwen3-4B Avg@K": fmt(paper.get(method, np.nan), 2),
               "paper Δ vs GRPO": "–" if method == "grpo" else fmt(gain, 2, sign=True)}
        for key in ours.get(method) or [(method, *[np.nan] * (len(keys) - 1))]:
            row = dict(ref)
            for task in sorted(agg["task"].unique()):
                sel = select_rows(agg, keys, key, task=task)
                row[f"ours {task} {metric_label(metric)}"] = (
                    "–" if sel.empty else fmt_ci(*sel.iloc[0][["mean", "ci95_low", "ci95_high"]], scale, digits))
                diff = pd.DataFrame() if pairs is None or method == "grpo" else select_rows(
                    pairs, keys, key, task=task)
                row[f"ours {task} Δ vs GRPO"] = "–" if diff.empty else fmt(diff.iloc[0]["mean_diff"] * scale,
                                                                           digits, sign=True)
            out[row_label(dict(zip(keys, key, strict=True)))] = row
    return pd.DataFrame.from_dict(out, orient="index").rename_axis("method")


def _verdict(task: str, who: str, r: pd.Series, name: str, scale: float, unit: str, digits: int) -> str:
    d = f"{r['mean_diff'] * scale:+.{digits}f} {unit}".rstrip()
    n = int(r["n_pairs"])
    ci = f"95% CI {fmt_interval(r['ci95_low'], r['ci95_high'], scale, digits)} over {n} paired seeds"
    flag = r.get("flag")
    if isinstance(flag, str) and flag == "zero variance":
        return (f"{task}: {who} minus GRPO on {name} is {d} in each of {n} seed pairs (zero variance): too few "
                f"seeds on a coarse metric to estimate an interval, so no claim either way.")
    if pd.isna(r["ci95_low"]) or pd.isna(r["ci95_high"]):
        return f"{task}: {who} minus GRPO on {name} is {d} from {n} seed pair(s); no interval, so no claim either way."
    mde = r.get("mde80", np.nan)
    power = "" if pd.isna(mde) else f"; detectable at 80% power: {mde * scale:.{digits}f} {unit}".rstrip()
    holm = r.get("p_holm", np.nan)
    corrected = "" if pd.isna(holm) else f"; Holm-adjusted p={holm:.3f} over the table's {name} comparisons"
    if flagged_non_result(r):
        return (f"{task}: {who} minus GRPO on {name} is {d} ({ci}{power}): a non-result, since the design "
                f"detects only effects larger than GRPO's own gain ({r['reference_gain'] * scale:+.{digits}f} {unit}).")
    if (r["ci95_low"] > 0 or r["ci95_high"] < 0) and not pd.isna(holm) and holm > 0.05:
        return (f"{task}: {who} minus GRPO on {name} is {d} ({ci}): the interval excludes 0, but not after "
                f"correcting for the table's {name} comparisons (Holm-adjusted p={holm:.3f}), so no claim.")
    if r["ci95_low"] > 0:
        return f"{task}: {who} beats GRPO on {name} by {d} ({ci}; the interval excludes 0{corrected})."
    if r["ci95_high"] < 0:
        return f"{task}: {who} is worse than GRPO on {name} by {d} ({ci}; the interval excludes 0{corrected})."
    return f"{task}: {who} does not beat GRPO on {name}: the difference is {d} and the {ci} includes 0{power}."


def summary_sentences(paired: pd.DataFrame, metric: str = "avg_at_k", digits: int = 1) -> list[str]:
    """One plain sentence per task and method (and other axis values): does the paired difference
    to GRPO exclude 0?"""
    sel = paired[(paired["metric"] == metric) & (paired["method"] != "grpo")]
    unit = "points" if metric in PERCENT else ""
    keys, out = row_keys(sel), []
    for task in sorted(sel["task"].unique()):
        for key in sorted_rows(sel, keys):
            rows = select_rows(sel, keys, key, task=task)
            if not rows.empty:
                who = row_label(dict(zip(keys, key, strict=True)))
                out.append(_verdict(task, who, rows.iloc[0], metric_label(metric), scale_of(metric), unit, digits))
    return out


def _cell(value) -> str:
    return "" if value is None or (not isinstance(value, str) and pd.isna(value)) else str(value)


def to_markdown(table: pd.DataFrame, caption: str | None = None) -> str:
    """A GitHub Markdown table, the index as the first column, with an optional caption line."""
    header = [table.index.name or "", *map(str, table.columns)]
    lines = [f"| {' | '.join(header)} |", f"|{'|'.join(['---'] + ['---:'] * len(table.columns))}|"]
    for idx, row in table.iterrows():
        cells = [_cell(idx), *(_cell(v) for v in row)]
        lines.append(f"| {' | '.join(c.replace('|', '/') for c in cells)} |")
    text = "\n".join(lines) + "\n"
    return f"{caption}\n\n{text}" if caption else text


_LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  "±": r"$\pm$", "Δ": r"$\Delta$", "–": "--"}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_ESCAPES.get(ch, ch) for ch in str(text))


def to_latex(table: pd.DataFrame, caption: str | None = None, label: str | None = None) -> str:
    """A booktabs `table` environment (needs `\\usepackage{booktabs}`)."""
    header = [table.index.name or "", *map(str, table.columns)]
    body = [" & ".join(latex_escape(_cell(c)) for c in [idx, *row]) + r" \\" for idx, row in table.iterrows()]
    lines = [r"\begin{table}[t]", r"\centering", r"\small",
             rf"\begin{{tabular}}{{l{'r' * len(table.columns)}}}", r"\toprule",
             " & ".join(latex_escape(h) for h in header) + r" \\", r"\midrule", *body, r"\bottomrule",
             r"\end{tabular}"]
    if caption:
        lines.append(rf"\caption{{{latex_escape(caption)}}}")
    if label:
        lines.append(rf"\label{{{label}}}")
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"
