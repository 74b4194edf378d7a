"""Peak memory of one loss forward and backward (`grpo`, `oisd`) at the real 151,936-token
vocabulary, for 4 x 1,024 and 8 x 2,048 completion tokens (the `memory` bench section at these
shapes). Prints one line per case and writes JSON.

    OMP_NUM_THREADS=1 python benchmarks/loss_memory.py --out benchmarks/results/loss_memory.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from oisd_lab.bench.common import Settings
from oisd_lab.bench.memory import bench_memory

SHAPES = ((4, 1024), (8, 2048))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--shapes", default=",".join(f"{b}x{c}" for b, c in SHAPES),
                        help="comma list of BATCHxCOMPLETION")
    parser.add_argument("--presets", default="grpo,oisd")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = []
    for shape in args.shapes.split(","):
        batch, completion = (int(x) for x in shape.split("x"))
        s = dataclasses.replace(Settings(), mem_tokens=batch * completion, mem_completion=completion,
                                presets=tuple(args.presets.split(",")), generations=batch)
        row = bench_memory(s)
        for name, v in row["per_preset"].items():
            print(f"{batch} x {completion}, V = {row['vocab_size']}: {name} peak {v['peak_bytes'] / 2**30:.2f} GiB "
                  f"(RSS {v['rss_peak_bytes'] / 2**30:.2f} GiB; whole logits would be "
                  f"{row['logits_bytes'] / 2**30:.2f} GiB)", flush=True)
        results.append(row)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
