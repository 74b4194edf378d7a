"""Write a mutation report (default reports/mutation/latest.md) from mutmut's results: the score per module and the diff of
every surviving mutant, with the explanations kept in reports/mutation/explained.md (a line
`- <mutant name>: equivalent | kept: <reason>` per mutant that a human has looked at)."""

from __future__ import annotations

import argparse
import collections
import math
import random
import re
import subprocess
import time
from pathlib import Path

OUT = Path("reports/mutation")
KILLED = {"killed", "timeout", "segfault"}


def results() -> dict[str, str]:
    """mutant name -> status, as `mutmut results --all true` prints it."""
    text = subprocess.run(["mutmut", "results", "--all", "true"], capture_output=True, text=True, check=True).stdout
    return dict(re.findall(r"^\s*(\S+): (.+?)\s*$", text, flags=re.M))


def diff(name: str) -> str:
    text = subprocess.run(["mutmut", "show", name], capture_output=True, text=True).stdout
    return "\n".join(line for line in text.splitlines() if re.match(r"^[-+](?![-+])", line))


def explained() -> dict[str, str]:
    path = OUT / "explained.md"
    if not path.is_file():
        return {}
    return dict(re.findall(r"^- (\S+): (.+)$", path.read_text(), flags=re.M))


def module_of(name: str) -> str:
    """The module of a mutant's name (`oisd_lab.losses.policy.x_kl_estimate__mutmut_13`)."""
    return name.split(".x")[0]


def sample(names: list[str], fraction: float, seed: int) -> list[str]:
    """A seeded sample of each module's mutants: ceil(fraction x its count), at least one."""
    by_module: dict[str, list[str]] = collections.defaultdict(list)
    for name in sorted(names):
        by_module[module_of(name)].append(name)
    rng = random.Random(seed)
    return sorted(n for group in by_module.values()
                  for n in rng.sample(group, max(1, math.ceil(fraction * len(group)))))


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson 95% interval of a proportion k / n."""
    p, d = k / n, 1 + z * z / n
    mid, half = (p + z * z / (2 * n)) / d, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, mid - half), min(1.0, mid + half)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--pattern", nargs="*", default=[], help="mutant name patterns (default: all)")
    parser.add_argument("--out", type=Path, default=OUT / "latest.md", help="the report file")
    parser.add_argument("--sample", type=float, default=None, metavar="FRACTION",
                        help="with --sample-out: write a seeded sample of each module's mutants, one name a line")
    parser.add_argument("--sample-out", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", type=Path, default=None, help="report only the mutants named in this file")
    args = parser.parse_args()
    status = {k: v for k, v in results().items() if not args.pattern or any(
        re.fullmatch(p.replace(".", r"\.").replace("*", ".*"), k) for p in args.pattern)}
    if args.sample_out is not None:
        if args.sample is None or not 0 < args.sample <= 1:
            parser.error("--sample-out needs --sample FRACTION in (0, 1]")
        chosen = sample(list(status), args.sample, args.seed)
        args.sample_out.write_text("".join(f"{n}\n" for n in chosen))
        print(f"sampled {len(chosen)} of {len(status)} mutants into {args.sample_out}")
        return
    only = set(args.only.read_text().split()) if args.only is not None else None
    if only is not None:
        status = {k: v for k, v in status.items() if k in only}
    notes = explained()
    by_module: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for name, state in status.items():
        module = module_of(name)
        note = notes.get(name, "") if state == "survived" else ""
        kind = ("killed" if state in KILLED else "equivalent" if note.startswith("equivalent")
                else "killed since" if note.startswith("killed since") else state)
        by_module[module][kind] += 1
    lines = ["# Mutation score", "",
             f"`bash scripts/mutation.sh {' '.join(args.pattern)!r} {args.workers}{f' {args.sample:g}' if args.sample else ''}` on "
             f"{time.strftime('%Y-%m-%d')}: {args.seconds // 60} min with {args.workers} worker(s).", "",
             "Score = killed / (killed + survived), where survivors explained as equivalent in "
             "`explained.md` (the same behaviour) are left out. 'no tests': no test covers the line.", "",
             "'killed since': survivors of the run that tests added after it kill (`explained.md` says how "
             "this was checked); 'not checked': mutants the run did not reach.", "",
             *([f"The run checked a seeded sample of each module's mutants ({len(status)} in all); the "
                "interval is the Wilson 95% interval of the score now, as an estimate for all of the "
                "module's mutants.", ""] if only is not None else []),
             "| module | mutants | killed | survived | equivalent | killed since | not checked | score (run) | "
             "score (now) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    def row(label: str, c: collections.Counter) -> str:
        judged = c["killed"] + c["survived"] + c["killed since"]
        run = f"{100 * c['killed'] / judged:.1f}%" if judged else "-"
        now = f"{100 * (c['killed'] + c['killed since']) / judged:.1f}%" if judged else "-"
        if only is not None and judged:
            low, high = wilson(c["killed"] + c["killed since"], judged)
            now += f" [{100 * low:.1f}, {100 * high:.1f}]"
        return (f"| {label} | {sum(c.values())} | {c['killed']} | {c['survived']} | {c['equivalent']} | "
                f"{c['killed since']} | {c['not checked']} | {run} | {now} |")

    lines += [row(module, c) for module, c in sorted(by_module.items())]
    total = sum(by_module.values(), collections.Counter())
    if total["killed"] + total["survived"] + total["killed since"]:
        lines.append(row("all", total))
    lines += ["", "## Surviving mutants", ""]
    for name, state in sorted(status.items()):
        if state == "survived" and not notes.get(name, "").startswith("killed since"):
            lines += [f"### {name}", "", f"{notes.get(name, 'not yet explained')}", "", "```diff", diff(name), "```", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
