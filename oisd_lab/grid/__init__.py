"""Ablation grids: a YAML file of base overrides and axes, expanded into cells that run, resume
and retry.

A grid file (`experiments/grids/*.yaml`) has three keys:

    name: components                      # grid name: W&B group and default folder runs/grids/<name>
    base: [max_steps=100, log.every_n_steps=25]   # overrides shared by every cell
    axes:                                 # cells = cartesian product, first axis varies slowest
      method: [grpo, oisd]
      seed: [0, 1, 2]

An axis named `recipe` takes sets of overrides as values (`- {model.lora_rank: 16, grpo.lr: 2e-4}`),
for settings of several groups that go together and must not be crossed with each other.

A cell's overrides are `base`, then its axis values, then the command line's overrides (a later
value for the same key wins). Every cell is composed, validated and checked against its task
and model (as `train` checks them) before anything runs. A cell's
`run_id` is a hash of its resolved config without the execution settings (`run_dir`,
`num_threads`, `log.*`, `pretrain.cache_dir`); it lives in `<grid_dir>/cells/<cell id>/`, with
cell ids such as `oisd-arith-s0-1a2b3c4d`. Because the id covers every field, adding a config
field or changing a default gives new ids (and new runs).

Each cell is one `python -m oisd_lab train ...` process in its own process group, so a crash or a
kill stays in its cell; stopping the runner (Ctrl-C, SIGTERM) stops its cells. Finished cells are
skipped, unfinished ones resume from their last checkpoint, failed ones are retried
(`--no-retry-failed` skips them); each cell keeps `log.txt` and, in `status.json`, its attempts and
the tail of a failure's log.

    oisd-lab grid components --workers 2                 # local, two cells at a time
    oisd-lab grid layers seed=3 --out runs/grids/l3      # overrides go right after the file
    oisd-lab grid components --dry-run                   # the cells, their state and commands

On a SLURM cluster, `--launcher slurm` submits one job per unfinished cell through submitit
(`pip install -e ".[slurm]"`); each job runs the same train command with `num_threads` equal to
`--slurm-cpus`, and a rerun skips cells whose job is still queued or running:

    oisd-lab grid components --launcher slurm --slurm-partition gpu --slurm-gpus 1 \
        --slurm-cpus 8 --slurm-time 120 --slurm-mem 32 --slurm-setup "module load cuda" --dry-run

With `--dry-run` the sbatch scripts are built but nothing is submitted.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from collections import Counter
from pathlib import Path

from ..errors import ConfigError
from ..run.folder import GRID_MANIFEST, RunDir
from .local import Progress, cell_command, cell_dir, run_local, state
from .slurm import require_submitit, slurm_parameters, slurm_script, submit_slurm
from .spec import (
    Cell,
    Grid,
    compact,
    config_hash,
    expand,
    find_grid_file,
    hydra_value,
    load_grid,
)


def add_arguments(parser) -> None:
    import argparse

    parser.description, parser.formatter_class = __doc__, argparse.RawDescriptionHelpFormatter
    parser.add_argument("file", help="grid file, or the name of one in experiments/grids (components)")
    parser.add_argument("overrides", nargs="*",
                        help="key=value overrides applied to every cell (right after FILE, before options)")
    parser.add_argument("--out", help="grid folder (default runs/grids/<name>)")
    parser.add_argument("--workers", type=int, default=1, help="cells run at the same time (local)")
    parser.add_argument("--dry-run", action="store_true", help="list the cells and commands; run nothing")
    parser.add_argument("--retry-failed", action=argparse.BooleanOptionalAction, default=True,
                        help="rerun cells that failed before (default: yes)")
    parser.add_argument("--launcher", choices=("local", "slurm"), default="local")
    slurm = parser.add_argument_group("slurm (one job per cell, through submitit)")
    slurm.add_argument("--slurm-partition")
    slurm.add_argument("--slurm-time", type=int, default=60, help="minutes per job")
    slurm.add_argument("--slurm-cpus", type=int, default=2, help="cpus per job (= num_threads)")
    slurm.add_argument("--slurm-gpus", type=int, default=0, help="gpus per job")
    slurm.add_argument("--slurm-mem", type=int, help="GB per job")
    slurm.add_argument("--slurm-account")
    slurm.add_argument("--slurm-qos")
    slurm.add_argument("--slurm-constraint")
    slurm.add_argument("--slurm-setup", action="append", help="shell line run before the job (repeatable)")


def run(args) -> int:
    if args.workers < 1:
        raise ConfigError(f"--workers: is {args.workers}; use >= 1")
    grid = load_grid(find_grid_file(args.file), args.overrides, check=True)  # a bad cell stops all
    grid_dir = Path(args.out or Path("runs") / "grids" / grid.name)
    states = {c.id: state(cell_dir(grid_dir, c)) for c in grid.cells}
    todo = [c for c in grid.cells if states[c.id] in ("new", "unfinished")
            or (states[c.id] == "failed" and args.retry_failed)]
    kept_failed = sum(states[c.id] == "failed" and not args.retry_failed for c in grid.cells)
    if args.launcher == "slurm":
        require_submitit()
    if args.dry_run:
        return _dry_run(grid, grid_dir, todo, states, args)
    grid_dir.mkdir(parents=True, exist_ok=True)
    manifest = grid_dir / GRID_MANIFEST
    tmp = manifest.with_name(f"{manifest.name}.tmp{os.getpid()}")  # atomic: a reader never sees half of it
    tmp.write_text(json.dumps(grid.manifest(), indent=2, default=str))
    os.replace(tmp, manifest)
    if args.launcher == "slurm":
        submit_slurm(grid, grid_dir, todo, args)
        print(f"collect when the jobs are done: oisd-lab collect {grid_dir}")
        return 0
    done = sum(s == "finished" for s in states.values())
    progress = Progress(grid.name, done, kept_failed, len(todo))
    started = time.time()
    try:
        outcome = run_local(grid, grid_dir, todo, progress, args.workers)
    except KeyboardInterrupt:
        print(f"[grid {grid.name}] interrupted; running cells were stopped. Run the same command again "
              "to resume them from their last checkpoint.", file=sys.stderr, flush=True)
        return 130
    return _summary(grid, grid_dir, outcome, done, time.time() - started)


def _summary(grid: Grid, grid_dir: Path, outcome: dict, skipped: int, seconds: float) -> int:
    failed = [c for c in grid.cells if state(cell_dir(grid_dir, c)) == "failed"]
    finished = sum(state(cell_dir(grid_dir, c)) == "finished" for c in grid.cells)
    print(f"[grid {grid.name}] {finished}/{len(grid.cells)} cells finished ({skipped} already were, "
          f"{sum(v == 'finished' for v in outcome.values())} ran now), {len(failed)} failed, {seconds:.0f} s")
    for cell in failed:
        folder = cell_dir(grid_dir, cell)
        print(f"  failed {cell.id}: {RunDir(folder).read_status().get('error')}  (log: {RunDir(folder).log})")
    if failed:
        print("run the same command again to retry the failed cells")
    print(f"collect: oisd-lab collect {grid_dir}")
    return 1 if failed or finished < len(grid.cells) else 0


def _dry_run(grid: Grid, grid_dir: Path, todo: list[Cell], states: dict, args) -> int:
    print(f"[grid {grid.name}] {len(grid.cells)} cells in {grid_dir}; {len(todo)} to run "
          f"({', '.join(f'{n} {s}' for s, n in Counter(states.values()).items())})")
    for cell in grid.cells:
        mark = "run " if cell in todo else "skip"
        print(f"  {mark} {states[cell.id]:<10} {cell.id}")
    for cell in todo:
        folder = cell_dir(grid_dir, cell)
        threads = args.slurm_cpus if args.launcher == "slurm" else 1
        print(shlex.join(cell_command(grid, cell, folder, threads)))
    if args.launcher == "slurm" and todo:
        scripts = [slurm_script(slurm_parameters(args, grid, c), cell_command(grid, c, cell_dir(grid_dir, c),
                                                                             args.slurm_cpus)) for c in todo]
        print(f"# sbatch directives and command of {todo[0].id} ({len(scripts)} jobs would be submitted):")
        print(scripts[0])
    return 0


__all__ = ["Cell", "Grid", "add_arguments", "cell_command", "cell_dir", "compact", "config_hash",
           "expand", "find_grid_file", "hydra_value", "load_grid", "run", "slurm_parameters",
           "slurm_script", "state"]
