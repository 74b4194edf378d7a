"""`oisd-lab launch`: one training run over several nodes of a SLURM cluster, in one command.

    oisd-lab launch --nodes 2 --gpus-per-node 8 --partition gpu --time 600 \\
        --config paper/qwen3-4b-oisd run_dir=runs/qwen3-4b-oisd-2x8 --dry-run

writes an sbatch script whose one `srun` starts `--nodes` x `--gpus-per-node` tasks, each running
the same `oisd-lab train` command with `num_nodes` and `devices` set to match the allocation (each
task takes its rank from SLURM, README "Sharded and multi-node training"), and submits it with
`sbatch`. `--dry-run` prints the script and submits and writes nothing. The config and overrides
are composed and checked first, so a bad field stops here, not on the cluster. The run folder is
fixed at launch (every task must write to the same one, on a file system all nodes share); the
same command sent again resumes the run from its last checkpoint, and is refused while the run's
previous job is still queued or running.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from .errors import ConfigError

SET_BY_LAUNCH = {"num_nodes": "--nodes", "devices": "--gpus-per-node / --ranks-per-node",
                 "num_threads": "--cpus-per-task"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", help="key=value config overrides of the train command")
    parser.add_argument("--config", default="train", metavar="NAME",
                        help="config in experiments/ to start from (default train; e.g. paper/qwen3-4b-oisd)")
    parser.add_argument("--nodes", type=int, required=True, help="nodes of the run (num_nodes)")
    parser.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node; one rank each (default 0: CPU ranks)")
    parser.add_argument("--ranks-per-node", type=int, default=None,
                        help="ranks (tasks) per node (devices); default: --gpus-per-node, or 1 without GPUs")
    parser.add_argument("--cpus-per-task", type=int, default=8, help="CPU cores per rank (= num_threads; default 8)")
    parser.add_argument("--time", type=int, default=60, help="minutes (default 60)")
    parser.add_argument("--partition")
    parser.add_argument("--account")
    parser.add_argument("--qos")
    parser.add_argument("--constraint")
    parser.add_argument("--mem", type=int, help="GB per node")
    parser.add_argument("--setup", action="append", help="shell line run before srun, e.g. 'module load cuda' (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch script; submit and write nothing")


def _ranks_per_node(args) -> int:
    if args.nodes < 1:
        raise ConfigError(f"--nodes: must be a whole number of nodes >= 1, got {args.nodes}")
    if args.gpus_per_node < 0:
        raise ConfigError(f"--gpus-per-node: must be >= 0, got {args.gpus_per_node}")
    ranks = args.ranks_per_node or args.gpus_per_node or 1
    if ranks < 1:
        raise ConfigError(f"--ranks-per-node: must be >= 1, got {ranks}")
    if args.gpus_per_node and ranks > args.gpus_per_node:
        raise ConfigError(f"--ranks-per-node: {ranks} ranks on {args.gpus_per_node} GPUs per node; each rank needs "
                          f"its own GPU, pass --ranks-per-node {args.gpus_per_node} or fewer")
    return ranks


def train_overrides(args) -> tuple[list[str], object]:
    """The train command's overrides with the allocation's num_nodes, devices, num_threads and a
    fixed absolute run_dir, and the TrainConfig they compose to (checked here, before submitting)."""
    # on use: Hydra composition loads only when the command runs, so `oisd-lab --help` starts fast
    from .config import compose
    from .grid.spec import override_key
    from .run.folder import default_run_dir

    ranks = _ranks_per_node(args)
    for item in args.overrides:
        key = override_key(item)
        if key in SET_BY_LAUNCH:
            raise ConfigError(f"{key}: set by `oisd-lab launch` from {SET_BY_LAUNCH[key]}; drop {item}")
    overrides = [*args.overrides, f"num_nodes={args.nodes}", f"devices={ranks}", f"num_threads={args.cpus_per_task}"]
    cfg = compose(overrides, config_name=args.config)
    if args.gpus_per_node and cfg.accelerator == "cpu":
        raise ConfigError(f"accelerator: 'cpu' with --gpus-per-node {args.gpus_per_node}; pass accelerator=gpu, "
                          "or --gpus-per-node 0 for CPU ranks")
    if not args.gpus_per_node and cfg.accelerator == "gpu":
        raise ConfigError("accelerator: 'gpu' but --gpus-per-node is 0; pass --gpus-per-node N (GPUs per node)")
    run_dir = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(cfg.task.name, cfg.method.name, cfg.seed)
    run_dir = run_dir if run_dir.is_absolute() else Path.cwd() / run_dir
    overrides = [o for o in overrides if override_key(o) != "run_dir"] + [f"run_dir={run_dir}"]
    cfg.run_dir = str(run_dir)
    return overrides, cfg


def sbatch_script(args, overrides: list[str], cfg) -> str:
    """The job: directives for nodes x ranks tasks, the setup lines, and one `srun` of the train command."""
    run_dir = Path(cfg.run_dir)
    directives = {"job-name": f"oisd-{run_dir.name}", "nodes": args.nodes,
                  "ntasks-per-node": cfg.devices, "cpus-per-task": args.cpus_per_task,
                  "time": args.time, "chdir": Path.cwd(), "output": run_dir / "slurm" / "%j.out"}
    optional = {"gpus-per-node": args.gpus_per_node or None, "partition": args.partition, "account": args.account,
                "qos": args.qos, "constraint": args.constraint, "mem": f"{args.mem}G" if args.mem else None}
    directives.update({k: v for k, v in optional.items() if v is not None})
    lines = ["#!/bin/bash", *(f"#SBATCH --{k}={shlex.quote(str(v))}" for k, v in directives.items()), ""]
    lines += [*(args.setup or []), "export TOKENIZERS_PARALLELISM=false", ""]
    command = ["srun", sys.executable, "-m", "oisd_lab", "train"]
    if args.config != "train":
        command += ["--config", args.config]
    return "\n".join([*lines, shlex.join([*command, *overrides]), ""])


def _still_queued(job_id: str) -> str | None:
    """SLURM's state of a job that has not ended, or None (ended, unknown, or no squeue here)."""
    if not shutil.which("squeue"):
        return None
    done = subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%T"], capture_output=True, text=True)
    state = done.stdout.strip()
    return state or None


def submit(script: str, run_dir: Path) -> str:
    """Write the script into the run folder's slurm/ and submit it; returns the job id."""
    if not shutil.which("sbatch"):
        raise ConfigError("sbatch: not found on PATH; run `oisd-lab launch` on the cluster's login node, "
                          "or add --dry-run to print the script")
    folder = run_dir / "slurm"
    jobs_file = folder / "jobs.json"
    jobs = json.loads(jobs_file.read_text()) if jobs_file.is_file() else []
    if jobs and (state := _still_queued(jobs[-1])):
        raise ConfigError(f"run_dir: job {jobs[-1]} of {run_dir} is still {state.lower()}; "
                          f"wait for it or `scancel {jobs[-1]}` before launching the run again")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"launch-{len(jobs) + 1}.sbatch"
    path.write_text(script)
    done = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines() or ["no message"]
        raise ConfigError(f"sbatch: refused {path}: {lines[-1]}")
    job_id = done.stdout.strip().split(";")[0]
    jobs_file.write_text(json.dumps([*jobs, job_id]) + "\n")
    return job_id


def run(args: argparse.Namespace) -> int:
    overrides, cfg = train_overrides(args)
    script = sbatch_script(args, overrides, cfg)
    if args.dry_run:
        print(script, end="")
        print(f"# --dry-run: not submitted; run folder {cfg.run_dir}", file=sys.stderr)
        return 0
    job_id = submit(script, Path(cfg.run_dir))
    print(f"submitted job {job_id}: {cfg.num_nodes} node(s) x {cfg.devices} rank(s); "
          f"log {Path(cfg.run_dir) / 'slurm' / f'{job_id}.out'}")
    print(cfg.run_dir)
    return 0


__all__ = ["add_arguments", "run", "sbatch_script", "submit", "train_overrides"]
