"""Write a mutation report (default reports/mutation/latest.md) from mutmut's results: the score per module and the diff of
every surviving mutant, with the explanations kept in reports/mutation/explained.md (a line
`- <mutant name>: equivalent | kept: <reason>` per mutant that a human has looked at)."""

from __future__ import annotations

import argparse
import collections
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--pattern", nargs="*", default=[], help="mutant name patterns (default: all)")
    parser.add_argument("--out", type=Path, default=OUT / "latest.md", help="the report file")
    args = parser.parse_args()
    status = {k: v for k, v in results().items() if not args.pattern or any(
        re.fullmatch(p.replace(".", r"\.").replace("*", ".*"), k) for p in args.pattern)}
    notes = explained()
    by_module: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for name, state in status.items():
        module = name.split(".x")[0]
        note = notes.get(name, "") if state == "survived" else ""
        kind = ("killed" if state in KILLED else "equivalent" if note.startswith("equivalent")
                else "killed since" if note.startswith("killed since") else state)
        by_module[module][kind] += 1
    lines = ["# Mutation score", "",
             f"`bash scripts/mutation.sh {' '.join(args.pattern)!r} {args.workers}` on "
             f"{time.strftime('%Y-%m-%d')}: {args.seconds // 60} min with {args.workers} worker(s).", "",
             "Score = killed / (killed + survived), where survivors explained as equivalent in "
             "`explained.md` (the same behaviour) are left out. 'no tests': no test covers the line.", "",
             "'killed since': survivors of the run that tests added after it kill (`explained.md` says how "
             "this was checked); 'not checked': mutants the run did not reach.", "",
             "| module | mutants | killed | survived | equivalent | killed since | not checked | score (run) | "
             "score (now) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for module, c in sorted(by_module.items()):
        judged = c["killed"] + c["survived"] + c["killed since"]
        run = f"{100 * c['killed'] / judged:.1f}%" if judged else "-"
        now = f"{100 * (c['killed'] + c['killed since']) / judged:.1f}%" if judged else "-"
        lines.append(f"| {module} | {sum(c.values())} | {c['killed']} | {c['survived']} | {c['equivalent']} | "
                     f"{c['killed since']} | {c['not checked']} | {run} | {now} |")
    lines += ["", "## Surviving mutants", ""]
    for name, state in sorted(status.items()):
        if state == "survived" and not notes.get(name, "").startswith("killed since"):
            lines += [f"### {name}", "", f"{notes.get(name, 'not yet explained')}", "", "```diff", diff(name), "```", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
