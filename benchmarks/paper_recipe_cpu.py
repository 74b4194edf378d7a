"""The paper recipe's own file (`--config paper/qwen3-4b-oisd`) on 2 CPU ranks (FSDP2 over gloo):
a Qwen3-architecture model with the recipe's depth (36 layers) and the real 151,936-token
vocabulary but width 64, trained for 2 steps with only size overrides, the local model and data
paths an offline machine passes (as the recipe's header says), and `log.plan=true`
(oisd_lab/bench/recipe.py says what is built and recorded).

    OMP_NUM_THREADS=1 python benchmarks/paper_recipe_cpu.py --out benchmarks/results/paper_recipe_cpu.json
    OMP_NUM_THREADS=1 python benchmarks/paper_recipe_cpu.py --extra log.gradient_view=false \
        --out benchmarks/results/paper_recipe_cpu_no_gradient_view.json

The command runs as a user runs it (`python -m oisd_lab train`); Lightning starts the second rank.
Both steps are logging steps (the first and the last); with the gradient view on (the default)
each rank holds the full parameters and one gradient buffer per loss term through them, which the
plan counts as a logging step; the second command turns the view off. Measured peaks are tensor
bytes (parameters, gradients, optimizer state held + the profiler's peak inside the phase), first 2
steps; the diagnostics pass runs on rank 0 only. Peak RSS also counts the interpreter, libraries,
the tokenizer, the held-out evaluation and the planner's own tracing.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from oisd_lab.bench.recipe import CPU_SHAPE, recipe_run  # noqa: E402

SIZE = ["max_steps=2", "checkpoint_every=2", "grpo.prompts_per_step=2", "grpo.num_generations=2",
        "grpo.micro_batch_size=2", "grpo.max_completion_length=8", "task.num_test=2", "eval.k=1",
        "eval.max_new_tokens=8", "eval.batch_size=2", "accelerator=cpu", "devices=2", "num_threads=1"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--extra", nargs="*", default=[], help="more overrides (e.g. log.gradient_view=false)")
    parser.add_argument("--keep", type=Path, default=None, help="run folder to keep (default: a temporary one)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="paper_cpu_"))
    result = recipe_run(work, CPU_SHAPE, SIZE, ranks=2, extra=args.extra, run_dir=args.keep)
    text = json.dumps(result, indent=2) + "\n"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text[:4000])
    print(f"work folder: {work}")


if __name__ == "__main__":
    main()
