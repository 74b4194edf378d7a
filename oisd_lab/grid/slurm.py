"""SLURM through submitit: one job per unfinished cell, running the same train command."""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path

from ..errors import ConfigError
from ..extras import require_extra
from ..run.folder import RunDir
from .local import cell_command, cell_dir, child_env, settle
from .spec import Cell, Grid


def slurm_parameters(args, grid: Grid, cell: Cell) -> dict:
    """submitit `SlurmExecutor` parameters of one cell's job."""
    params = {"job_name": f"{grid.name}-{cell.id}", "time": args.slurm_time, "nodes": 1,
              "ntasks_per_node": 1, "cpus_per_task": args.slurm_cpus}
    optional = {"partition": args.slurm_partition, "gpus_per_node": args.slurm_gpus or None,
                "mem": f"{args.slurm_mem}GB" if args.slurm_mem else None,
                "account": args.slurm_account, "qos": args.slurm_qos,
                "constraint": args.slurm_constraint, "setup": args.slurm_setup or None}
    return {**params, **{k: v for k, v in optional.items() if v is not None}}


def slurm_script(params: dict, command: list[str]) -> str:
    """The sbatch directives a cell's job is submitted with, its setup lines and the command it runs.

    Rendered here from the same parameters that go to submitit's public `update_parameters`:
    submitit has no public way to show a script without submitting it. The job submitit writes
    adds its own log paths and signal handling and runs `command` through a pickled call."""
    directives = {k: v for k, v in params.items() if k != "setup"}
    lines = ["#!/bin/bash", ""]
    for key in sorted(directives):
        lines.append(f"#SBATCH --{key.replace('_', '-')}={shlex.quote(str(directives[key]))}")
    if params.get("setup"):
        lines += ["", *params["setup"]]
    return "\n".join([*lines, "", shlex.join(command), ""])


def require_submitit():
    """The submitit module, or a one-line ConfigError naming the install command."""
    require_extra("slurm", "--launcher slurm")
    import submitit

    return submitit


def run_cell_job(folder: str, command: list[str], threads: int) -> str:
    """Body of a cell's SLURM job: the cell's command, recorded like a local cell."""
    folder_path, run = Path(folder), RunDir(folder)
    attempts = int(run.read_status().get("attempts", 0)) + 1
    with open(run.log, "ab") as log:
        log.write(f"==== attempt {attempts} (slurm): {shlex.join(command)}\n".encode())
        log.flush()
        offset = log.tell()
        run.write_status(attempts=attempts, returncode=None, error=None, log_tail=None)
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=child_env(threads)).returncode
    if settle(folder_path, offset, code) != "finished":
        raise RuntimeError(f"cell {folder_path.name} failed: {run.read_status().get('error')}")
    return "finished"


def _slurm_active(folder: Path, job_id: str | None) -> bool:
    if not job_id:
        return False
    try:
        import submitit

        return submitit.SlurmJob(folder=folder, job_id=str(job_id)).state in (
            "PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "UNKNOWN")
    except Exception:
        return False


def submit_slurm(grid: Grid, grid_dir: Path, todo: list[Cell], args) -> dict:
    """One SLURM job per cell; cells whose job is still queued or running are left alone."""
    submitit = require_submitit()
    folder = grid_dir / "slurm" / "%j"
    jobs = {}
    for cell in todo:
        here = cell_dir(grid_dir, cell)
        queued = RunDir(here).read_status().get("slurm_job_id")
        if _slurm_active(folder, queued):
            print(f"[grid {grid.name}] {cell.id}: job {queued} still queued or running")
            continue
        try:
            executor = submitit.SlurmExecutor(folder=folder)
        except RuntimeError as err:
            raise ConfigError(f"--launcher slurm: {err}") from err
        executor.update_parameters(**slurm_parameters(args, grid, cell))
        here.mkdir(parents=True, exist_ok=True)
        command = cell_command(grid, cell, here, args.slurm_cpus)
        job = executor.submit(run_cell_job, str(here), command, args.slurm_cpus)
        RunDir(here).write_status(status="submitted", slurm_job_id=job.job_id, grid=grid.name, cell=cell.id)
        jobs[cell.id] = job.job_id
        print(f"[grid {grid.name}] submitted {cell.id} as job {job.job_id}", flush=True)
    (grid_dir / "slurm").mkdir(parents=True, exist_ok=True)
    (grid_dir / "slurm" / "jobs.json").write_text(json.dumps(jobs, indent=2))
    return jobs
