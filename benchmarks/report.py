"""Markdown tables from `oisd-lab bench` result files (the tables in benchmarks/README.md), as
`oisd-lab bench` prints them after a run (`oisd_lab.bench.tables.markdown`).

    python benchmarks/report.py benchmarks/results/bench.json [more.json ...]
"""

from __future__ import annotations

import json
import sys

from oisd_lab.bench.tables import markdown


def main() -> None:
    for path in sys.argv[1:]:
        print(markdown(json.loads(open(path).read()), title=path))


if __name__ == "__main__":
    main()
