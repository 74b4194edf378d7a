"""The decisive grid's pre-registered reading, recomputed from the per-run files committed beside
this script (`grid/cells/<cell>/`: eval.json, metrics.jsonl, diagnostics.jsonl, status.json,
cell.json, config.yaml, env.json; `grid/grid.json` is the grid runner's manifest).

    python reports/decisive/analyse.py [runs_folder]     # writes outcome.md beside this file

Paired by seed; differences in points (x100). Statistics from `oisd_lab.power` (paired t-interval,
minimum detectable effect at 80% power, Holm over the secondary family, seeds needed).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from oisd_lab import power

HERE = Path(__file__).resolve().parent
METHODS = ("grpo", "oisd", "oisd_unsigned")
STEPS = 150
STUDENT = "L01"  # the tiny model's default student layer: 1 of 6 (method.layers empty)
LENS_JSD = f"diag/jsd/all/{STUDENT}"


def load(runs: Path) -> dict[tuple[str, int], dict]:
    """(method, seed) -> eval, metrics rows and status of every committed cell."""
    cells = {}
    for folder in sorted(p for p in runs.iterdir() if p.is_dir()):
        cell = json.loads((folder / "cell.json").read_text())
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line]
        cells[(cell["method"], int(cell["seed"]))] = {
            "name": folder.name, "eval": json.loads((folder / "eval.json").read_text()), "rows": rows,
            "status": json.loads((folder / "status.json").read_text())}
    return cells


def integrity(cells: dict) -> list[str]:
    """One line per cell that did not finish or whose metrics table lacks or repeats a step."""
    problems = []
    for (method, seed), cell in sorted(cells.items()):
        steps = [r["step"] for r in cell["rows"]]
        if cell["status"].get("status") != "finished":
            problems.append(f"{cell['name']}: status {cell['status'].get('status')}")
        if sorted(steps) != list(range(1, STEPS + 1)):
            problems.append(f"{cell['name']}: {len(steps)} rows, {len(set(steps))} distinct steps")
    return problems


def metric(cell: dict, name: str) -> float:
    """A held-out figure after RL (`avg`, `greedy`), its gain over the warm start, or the last
    logged value of a metrics-table key."""
    ev = cell["eval"]
    if name == "avg":
        return 100 * ev["after"]["avg_at_k"]
    if name == "greedy":
        return 100 * ev["after"]["greedy_acc"]
    if name == "avg_gain":
        return 100 * (ev["after"]["avg_at_k"] - ev["before"]["avg_at_k"])
    if name == "greedy_gain":
        return 100 * (ev["after"]["greedy_acc"] - ev["before"]["greedy_acc"])
    return [r[name] for r in cell["rows"] if r.get(name) is not None][-1]


def paired(cells: dict, method: str, name: str, reference: str = "grpo") -> dict:
    seeds = sorted(s for m, s in cells if m == method and (reference, s) in cells)
    diffs = [metric(cells[(method, s)], name) - metric(cells[(reference, s)], name) for s in seeds]
    summary = power.mean_ci(diffs)
    stats = power.comparison(summary["mean"], summary["std"], summary["n"])
    return {**summary, **stats, "diffs": diffs, "label": f"{method} - {reference}: {name}"}


def fmt(c: dict, digits: int = 2) -> str:
    if c["flag"]:
        return f"{c['mean']:+.{digits}f} ({c['flag']}, n={c['n']})"
    return (f"{c['mean']:+.{digits}f} [{c['ci95_low']:+.{digits}f}, {c['ci95_high']:+.{digits}f}], "
            f"n={c['n']}, {pval(c['p'])}, MDE80={c['mde80']:.{digits}f}")


def pval(p: float) -> str:
    return "p<0.001" if p < 0.001 else f"p={p:.3f}"


def reading(cells: dict) -> list[str]:
    gain = power.mean_ci([metric(cells[k], "avg_gain") for k in cells if k[0] == "grpo"])
    greedy_gain = power.mean_ci([metric(cells[k], "greedy_gain") for k in cells if k[0] == "grpo"])
    primary = paired(cells, "oisd", "avg")
    control = paired(cells, "oisd_unsigned", LENS_JSD)
    secondary = [paired(cells, "oisd", "greedy"), paired(cells, "oisd_unsigned", "avg"),
                 paired(cells, "oisd_unsigned", "greedy"), paired(cells, "oisd", LENS_JSD)]
    holm = power.holm([c["p"] for c in secondary])
    valid = gain["mean"] >= 3.0
    upper, lower = primary["ci95_high"], primary["ci95_low"]
    if not valid:
        verdict = "non-result: GRPO gained less than 3 points"
    elif lower > 0:
        verdict = "OISD helps at this size"
    elif upper < 0.25 * gain["mean"]:
        verdict = ("no useful effect at this size (upper bound below a quarter of GRPO's gain)"
                   + ("; OISD hurts (interval below 0)" if upper < 0 else ""))
    elif upper < 0:
        verdict = "OISD hurts at this size"
    else:
        need = power.seeds_needed(0.25 * gain["mean"], primary["std"]) if primary["std"] > 0 else "n/a"
        verdict = (f"inconclusive: MDE80 {primary['mde80']:.2f} points; {need} seeds would detect a "
                   f"quarter of GRPO's gain ({0.25 * gain['mean']:.2f} points)")
    lines = [
        "| item | result |", "|---|---|",
        f"| 1. validity: GRPO's Avg@8 gain over the warm start | {gain['mean']:+.2f} [{gain['ci95_low']:+.2f}, "
        f"{gain['ci95_high']:+.2f}] points, n={gain['n']} (greedy {greedy_gain['mean']:+.2f} "
        f"[{greedy_gain['ci95_low']:+.2f}, {greedy_gain['ci95_high']:+.2f}]): "
        f"{'counts (>= 3)' if valid else 'does not count (< 3)'} |",
        f"| 2. primary: oisd - grpo, Avg@8 after RL | {fmt(primary)}; a quarter of GRPO's gain is "
        f"{0.25 * gain['mean']:.2f} |",
        f"| reading of 2 | **{verdict}** |",
        f"| 3. positive control: oisd_unsigned - grpo, student lens JSD ({STUDENT}, last step, nats) | "
        f"{fmt(control, 4)}: {'the channel moved the lens' if control['ci95_high'] < 0 or control['ci95_low'] > 0 else 'the channel did NOT measurably move the lens'} |",
    ]
    for c, p in zip(secondary, holm, strict=True):
        digits = 4 if c["label"].endswith(STUDENT) else 2
        lines.append(f"| 4. secondary: {c['label']} | {fmt(c, digits)}; Holm-adjusted {pval(p)} (family of 4) |")
    return lines


def per_seed(cells: dict) -> list[str]:
    seeds = sorted({s for _, s in cells})
    lines = ["| seed | " + " | ".join(f"{m} Avg@8 / greedy" for m in METHODS) + f" | {METHODS[0]} .. {METHODS[2]} "
             f"lens JSD {STUDENT} |", "|---|" + "---:|" * (len(METHODS) + 1)]
    for s in seeds:
        acc = [f"{metric(cells[(m, s)], 'avg'):.2f} / {metric(cells[(m, s)], 'greedy'):.1f}"
               if (m, s) in cells else "-" for m in METHODS]
        jsd = " / ".join(f"{metric(cells[(m, s)], LENS_JSD):.4f}" for m in METHODS if (m, s) in cells)
        lines.append(f"| {s} | " + " | ".join(acc) + f" | {jsd} |")
    return lines


GRADIENT_KEYS = (("think", "logit channel"), ("attn", "attention channel"))


def run_mean(cell: dict, key: str) -> float | None:
    """Mean over the gradient-view steps of one logged key (metrics tables written before the
    rename call the norm ratio `share`)."""
    names = (key, key.replace("/norm_ratio", "/share"))
    xs = [r[n] for r in cell["rows"] for n in names if r.get(n) is not None]
    return sum(xs) / len(xs) if xs else None


def gradient_view(cells: dict) -> list[str]:
    """Per method and channel: the norm ratio |g_channel| / |g_policy| and the cosine between the
    two gradients, each averaged over a run's gradient-view steps, then over seeds."""
    lines = ["| method | channel | norm ratio mean [min, max over seeds] | cosine to policy gradient mean "
             "[min, max] | seeds |", "|---|---|---:|---:|---:|"]
    for method in METHODS[1:]:
        for term, label in GRADIENT_KEYS:
            ratio = [v for k, c in cells.items() if k[0] == method
                     if (v := run_mean(c, f"grad/{term}/norm_ratio")) is not None]
            cos = [v for k, c in cells.items() if k[0] == method
                   if (v := run_mean(c, f"grad/{term}/cos_policy")) is not None]
            if ratio and cos:
                lines.append(f"| {method} | {label} | {sum(ratio) / len(ratio):.4f} [{min(ratio):.4f}, "
                             f"{max(ratio):.4f}] | {sum(cos) / len(cos):+.4f} [{min(cos):+.4f}, {max(cos):+.4f}] "
                             f"| {len(ratio)} |")
    return lines


def main(argv: list[str]) -> int:
    runs = Path(argv[0]) if argv else HERE / "grid" / "cells"
    cells = load(runs)
    before = {round(c["eval"]["before"]["avg_at_k"], 6) for c in cells.values()}
    problems = integrity(cells)
    text = ["# Outcome (recomputed by `python reports/decisive/analyse.py`)", "",
            f"Cells: {len(cells)} ({', '.join(f'{m}: {sum(k[0] == m for k in cells)}' for m in METHODS)}); "
            f"warm start Avg@8 before RL: {', '.join(f'{100 * b:.2f}' for b in sorted(before))} (1,000 problems, K=8).",
            "",
            "Integrity: " + ("every cell finished, and every step 1..150 appears exactly once in every "
                             "metrics table." if not problems else "; ".join(problems)),
            "", *reading(cells), "",
            "Gradient view (step 1 and every 10th step, 16 per run; a ratio of gradient norms, not a fraction of the AdamW "
            "update):", "", *gradient_view(cells), "", "Per seed (after RL, %; lens JSD at the last step):", "", *per_seed(cells), ""]
    (HERE / "outcome.md").write_text("\n".join(text))
    print("\n".join(text))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
