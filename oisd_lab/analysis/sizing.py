"""Size a grid before running it, from a pilot grid's variance.

    oisd-lab power PILOT [--effect POINTS] [--metric avg_at_k] [--seeds N]

PILOT is a collected grid folder (or the folder of its tables, e.g. `reports/components/tables`).
For every paired comparison of `--metric` in its paired table, and for all of them pooled (the
variance of the differences averaged over comparisons, weighted by degrees of freedom), it prints
the pilot's seed pairs and standard deviation, the minimum detectable effect at 80% power
(two-sided alpha 0.05) with the pilot's seeds and with `--seeds`, and the seeds needed to detect
`--effect`. Effects are in the table's display unit: points for accuracies, raw units otherwise.
Without `--effect`, the target is a quarter of the reference's (GRPO's) own gain over the warm
start, where the table knows it.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from .. import power
from ..errors import ConfigError
from .runs import load_results, results_location
from .tables import row_keys, row_label, scale_of, select_rows, sorted_rows


def pooled_std(frame: pd.DataFrame) -> tuple[float, int]:
    """The pooled standard deviation of the paired differences (df-weighted variance) and its df."""
    usable = frame[(frame["n_pairs"] >= 2) & frame["std"].notna()]
    df = (usable["n_pairs"] - 1).sum()
    if df <= 0:
        return math.nan, 0
    return math.sqrt(float(((usable["n_pairs"] - 1) * usable["std"] ** 2).sum() / df)), int(df)


def size(paired: pd.DataFrame, metric: str, effect: float | None = None, seeds: int | None = None) -> pd.DataFrame:
    """One row per comparison of `metric` and one `pooled` row: n, std, MDE80 now and at `seeds`,
    the target effect and the seeds needed for it (display units)."""
    sel = paired[paired["metric"] == metric]
    if sel.empty:
        have = ", ".join(sorted(paired["metric"].unique())[:8])
        raise ConfigError(f"--metric: the pilot's paired table has no {metric!r}; use one of: {have}")
    scale = scale_of(metric)
    gains = sel["reference_gain"].dropna() if "reference_gain" in sel else pd.Series(dtype=float)
    target = effect if effect is not None else (0.25 * abs(gains.mean()) * scale if len(gains) else None)
    if target is None or not target > 0:
        raise ConfigError("--effect: the pilot has no reference gain for this metric; give the effect to detect, "
                          "e.g. --effect 2")
    keys = row_keys(sel)
    rows = []
    for task in sorted(sel["task"].unique()):
        for key in sorted_rows(sel, keys):
            found = select_rows(sel, keys, key, task=task)
            if not found.empty:
                r = found.iloc[0]
                rows.append(_row(f"{task}: {row_label(dict(zip(keys, key, strict=True)))}", r["std"] * scale,
                                 int(r["n_pairs"]), target, seeds))
    std, df = pooled_std(sel)
    typical = int(sel["n_pairs"].median())
    rows.append(_row(f"pooled sd ({len(sel)} comparisons, df {df}), at {typical} seeds", std * scale, typical,
                     target, seeds))
    return pd.DataFrame(rows).set_index("comparison")


def _row(name: str, std: float, n: int, target: float, seeds: int | None) -> dict:
    usable = n >= 2 and std > 0
    row = {"comparison": name, "seed pairs": n, "std": std,
           "MDE80 now": power.mde(std, n) if usable else math.nan}
    if seeds:
        row[f"MDE80 at {seeds} seeds"] = power.mde(std, seeds) if std > 0 else math.nan
    row["target effect"] = target
    try:
        row["seeds needed"] = power.seeds_needed(target, std) if std > 0 else "n/a (zero variance)"
    except ValueError:
        row["seeds needed"] = "> 10000"
    return row


def add_arguments(parser) -> None:
    import argparse

    parser.description, parser.formatter_class = __doc__, argparse.RawDescriptionHelpFormatter
    parser.add_argument("pilot", help="a collected grid folder or its tables folder, e.g. reports/components/tables")
    parser.add_argument("--metric", default="avg_at_k", help="the paired metric to size for (default avg_at_k)")
    parser.add_argument("--effect", type=float, help="the effect to detect, in points for accuracies "
                        "(default: a quarter of GRPO's own gain)")
    parser.add_argument("--seeds", type=int, help="also give the detectable effect with this many seeds")


def run(args) -> int:
    folder = results_location(Path(args.pilot))
    paired = load_results(folder)["paired"]
    if paired is None or paired.empty:
        raise ConfigError(f"pilot: {args.pilot} has no collected paired table; run `oisd-lab collect {args.pilot}` first")
    table = size(paired, args.metric, args.effect, args.seeds)
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.float_format", "{:.2f}".format):
        print(f"[power] {args.metric} from {folder} (two-sided alpha 0.05, 80% power, paired by seed)")
        print(table.to_string())
    return 0
