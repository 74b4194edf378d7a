"""Ablation grids: a YAML file of base overrides and axes, expanded into cells that run, resume
and retry.

A grid file (`experiments/grids/*.yaml`) has three keys:

    name: components                      # grid name: W&B group and default folder runs/grids/<name>
    base: [max_steps=100, log.every_n_steps=25]   # overrides shared by every cell
    axes:                                 # cells = cartesian product, first axis varies slowest
      method: [grpo, oisd]
      seed: [0, 1, 2]

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

    oisd-lab grid components --launcher slurm --slurm-partition gpu --slurm-gpus 1 \\
        --slurm-cpus 8 --slurm-time 120 --slurm-mem 32 --slurm-setup "module load cuda" --dry-run

With `--dry-run` the sbatch scripts are built but nothing is submitted.
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .config import ConfigError, compose, config_dir, to_dict

GRID_KEYS = ("name", "base", "axes")
EXECUTION_KEYS = ("run_dir", "num_threads", "log", "pretrain.cache_dir")
"""Config fields that say where and how a run executes, not what it computes: not in run ids."""
SET_BY_GRID = ("run_dir",)
TAIL_LINES = 20


@dataclass
class Cell:
    index: int
    id: str
    """Readable and unique: `<method>-<task>-s<seed>[-<other axes>]-<run_id[:8]>`; its folder name."""
    run_id: str
    overrides: list[str]
    axes: dict[str, Any]
    method: str
    task: str
    seed: int

    def tags(self, grid: str) -> list[str]:
        return [f"grid:{grid}", *(_tag(f"{k}:{compact(v)}") for k, v in self.axes.items())]


@dataclass
class Grid:
    name: str
    file: str
    base: list[str]
    axes: dict[str, list]
    overrides: list[str] = field(default_factory=list)
    cells: list[Cell] = field(default_factory=list)

    def manifest(self) -> dict:
        return {**asdict(self), "cells": [asdict(c) for c in self.cells]}


# ---------------------------------------------------------------------------- grid file, cells


def find_grid_file(name: str) -> Path:
    """A path, or the name of a file in experiments/grids (`components`)."""
    path = Path(name)
    if path.is_file():
        return path
    preset = config_dir() / "grids" / f"{name}.yaml"
    if preset.is_file():
        return preset
    known = ", ".join(sorted(p.stem for p in (config_dir() / "grids").glob("*.yaml")))
    raise ConfigError(f"{name}: no such grid file; the grids in experiments/grids are: {known}")


def load_grid(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Grid:
    """Read, check and expand a grid file; every cell is composed (bad cells raise ConfigError)."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a grid file is a mapping with the keys {', '.join(GRID_KEYS)}")
    for key in data:
        if key not in GRID_KEYS:
            raise ConfigError(f"grid.{key}: unknown key; use {', '.join(GRID_KEYS)}")
    name = str(data.get("name") or path.stem)
    if not re.fullmatch(r"[\w.-]+", name):
        raise ConfigError(f"grid.name: '{name}' must be letters, digits, '_', '.' or '-'")
    base = data.get("base") or []
    if not isinstance(base, list) or not all(isinstance(b, str) and "=" in b for b in base):
        raise ConfigError(f"grid.base: expected a list of key=value strings, got {base!r}")
    axes = data.get("axes") or {}
    if not isinstance(axes, dict):
        raise ConfigError(f"grid.axes: expected a mapping of key -> list of values, got {axes!r}")
    for key, values in axes.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"grid.axes.{key}: expected a non-empty list of values, got {values!r}")
    grid = Grid(name=name, file=str(path.resolve()), base=list(base), axes=dict(axes),
                overrides=list(overrides))
    grid.cells = expand(grid)
    return grid


def expand(grid: Grid) -> list[Cell]:
    """The cells of a grid in a fixed order (cartesian product, first axis slowest)."""
    for item in [*grid.base, *grid.overrides]:
        if _key(item) in SET_BY_GRID:
            raise ConfigError(f"{_key(item)}: set by the grid (cells live in <grid dir>/cells); use --out")
    cells, seen = [], {}
    for index, values in enumerate(itertools.product(*grid.axes.values())):
        axes = dict(zip(grid.axes, values, strict=True))
        axis_overrides = [_axis_override(k, v) for k, v in axes.items()]
        label = " ".join(axis_overrides) or "the only cell"
        overrides = merge_overrides(grid.base, axis_overrides, grid.overrides)
        try:
            cfg = compose(overrides)
        except ConfigError as err:
            raise ConfigError(f"grid {grid.name}: cell {index} ({label}): {err}") from err
        run_id = config_hash(to_dict(cfg))
        if run_id in seen:
            raise ConfigError(f"grid {grid.name}: cells {seen[run_id]} and {index} ({label}) have the "
                              "same config; does an override replace an axis?")
        seen[run_id] = index
        cell_id = _cell_name(cfg, axes, run_id)
        cells.append(Cell(index, cell_id, run_id, overrides, axes, cfg.method.name, cfg.task.name, cfg.seed))
    return cells


def check_cells(grid: Grid) -> None:
    """Check every cell as its `train` would before starting: the task source, and the student and
    diagnostic layers against the model's depth. Each task and model is looked at once."""
    from .preflight import check_layers, model_depth
    from .sources import load_source

    tasks: set[str] = set()
    depths: dict[str, int | None] = {}
    for cell in grid.cells:
        label = " ".join(_axis_override(k, v) for k, v in cell.axes.items()) or "the only cell"
        cfg = compose(cell.overrides)
        try:
            task_key = json.dumps(to_dict(cfg)["task"], sort_keys=True, default=str)
            if task_key not in tasks:
                load_source(cfg.task)
                tasks.add(task_key)
            model_key = cfg.pretrain.init or cfg.model.name
            if model_key not in depths:
                depths[model_key] = model_depth(cfg)
            if depths[model_key] is not None:
                check_layers(cfg, depths[model_key])
        except ConfigError as err:
            raise ConfigError(f"grid {grid.name}: cell {cell.index} ({label}): {err}") from err


def _cell_name(cfg, axes: dict, run_id: str) -> str:
    """`oisd-arith-s0-1a2b3c4d`; other axes add `<last key part><value>` (`layers2`)."""
    parts = [cfg.method.name, cfg.task.name, f"s{cfg.seed}"]
    parts += [f"{k.rsplit('.', 1)[-1]}{compact(v)}" for k, v in axes.items() if k not in ("method", "task", "seed")]
    return re.sub(r"[^\w.=+-]", "_", "-".join(parts))[:80] + f"-{run_id[:8]}"


def config_hash(config: dict) -> str:
    """12 hex digits of the resolved config, execution settings excluded."""
    data = json.loads(json.dumps(config, default=str))
    for dotted in EXECUTION_KEYS:
        *parents, last = dotted.split(".")
        node = data
        for part in parents:
            node = node.get(part, {})
        node.pop(last, None)
    return hashlib.sha1(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


def _axis_override(key: str, value: Any) -> str:
    """`key=value`; a mapping replaces a dict field (`task.difficulty`), which needs Hydra's `++`."""
    prefix = "++" if isinstance(value, dict) and not key.startswith("+") else ""
    return f"{prefix}{key}={hydra_value(value)}"


def merge_overrides(*groups: list[str]) -> list[str]:
    """Concatenate override lists; a later value for the same key replaces the earlier one."""
    merged: dict[str, str] = {}
    for group in groups:
        for item in group:
            if "=" not in item:
                raise ConfigError(f"{item}: overrides are key=value (e.g. method=oisd seed=1)")
            merged[_key(item)] = item
    return list(merged.values())


def _key(item: str) -> str:
    return item.partition("=")[0].lstrip("+~")


_PLAIN = re.compile(r"[A-Za-z_/][\w./-]*")


def hydra_value(value: Any) -> str:
    """A YAML value as a Hydra override value (lists and mappings included)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    text = str(value)
    if _PLAIN.fullmatch(text) and text.lower() not in ("true", "false", "null", "none", "inf", "nan"):
        return text
    if re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", text):
        return text  # YAML 1.1 reads `1e-4` as a string; Hydra reads it as the number meant
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def compact(value: Any) -> str:
    """A short text form of an axis value for tags and table columns (`[1, 2]` -> `1-2`)."""
    if isinstance(value, (list, tuple)):
        return "-".join(compact(v) for v in value)
    if isinstance(value, dict):
        return "-".join(f"{k}={compact(v)}" for k, v in value.items())
    return hydra_value(value).strip("'")


def _tag(text: str) -> str:
    return re.sub(r"[^\w.:=+-]", "_", text)[:64]


# ---------------------------------------------------------------------------- cell folders


def cell_dir(grid_dir: Path, cell: Cell) -> Path:
    return Path(grid_dir) / "cells" / cell.id


def read_status(folder: Path) -> dict:
    try:
        return json.loads((Path(folder) / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def write_status(folder: Path, **fields) -> None:
    """Merge fields into `status.json` (the format of `train.RunDir`; None deletes a field).

    Written here rather than through RunDir so that the runner does not import torch."""
    data = {**read_status(folder), **fields, "updated": time.time()}
    data = {k: v for k, v in data.items() if v is not None}
    tmp = Path(folder) / "status.json.tmp"
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, Path(folder) / "status.json")


def state(folder: Path) -> str:
    """finished, failed, new (never started) or unfinished (running, interrupted, submitted)."""
    status = read_status(folder).get("status")
    return status if status in ("finished", "failed") else ("new" if status is None else "unfinished")


def cell_command(grid: Grid, cell: Cell, folder: Path, threads: int = 1) -> list[str]:
    """The `train` command of a cell; grid-set keys are added unless the grid file sets them."""
    keys = {_key(o) for o in cell.overrides}
    extra = [f"run_dir={hydra_value(str(Path(folder).resolve()))}"]
    defaults = {"num_threads": str(threads), "log.wandb_group": hydra_value(grid.name),
                "log.tags": hydra_value(cell.tags(grid.name))}
    extra += [f"{k}={v}" for k, v in defaults.items() if k not in keys]
    return [sys.executable, "-m", "oisd_lab", "train", *cell.overrides, *extra]


def _child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env.setdefault("WANDB_MODE", "offline")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, str(threads))
    return env


def _tail(path: Path, offset: int) -> list[str]:
    with open(path, "rb") as handle:
        handle.seek(offset)
        lines = handle.read().decode(errors="replace").splitlines()
    return [line for line in lines if line.strip()][-TAIL_LINES:]


@dataclass
class Launch:
    cell: Cell
    folder: Path
    proc: subprocess.Popen
    log_offset: int
    started: float
    lock: Any


def launch(grid: Grid, cell: Cell, folder: Path, threads: int = 1) -> Launch | None:
    """Start a cell's process; None when another runner holds the cell."""
    folder.mkdir(parents=True, exist_ok=True)
    lock = open(folder / ".grid.lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        return None
    command = cell_command(grid, cell, folder, threads)
    (folder / "cell.json").write_text(json.dumps({**asdict(cell), "grid": grid.name,
                                                  "command": shlex.join(command)}, indent=2))
    attempts = int(read_status(folder).get("attempts", 0)) + 1
    write_status(folder, status="starting", attempts=attempts, grid=grid.name, cell=cell.id,
                 returncode=None, error=None, log_tail=None, failed=None)
    with open(folder / "log.txt", "ab") as log:
        log.write(f"==== attempt {attempts}, {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                  f"{shlex.join(command)}\n".encode())
        log.flush()
        offset = log.tell()
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=_child_env(threads), start_new_session=True, preexec_fn=_die_with_parent)
    write_status(folder, pid=proc.pid)  # the child's first status write comes seconds later
    return Launch(cell, folder, proc, offset, time.time(), lock)


def _die_with_parent() -> None:
    """Linux: the child gets SIGTERM if the runner dies without cleaning up (SIGKILL, OOM)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def settle(folder: Path, log_offset: int, returncode: int) -> str:
    """Record how a cell's process ended: finished, or failed with the tail of its log."""
    if returncode == 0 and read_status(folder).get("status") == "finished":
        write_status(folder, pid=None)
        return "finished"
    tail = _tail(folder / "log.txt", log_offset)
    reason = f"killed by signal {-returncode}" if returncode < 0 else (tail[-1] if tail else "no output")
    if returncode == 0:
        reason = "exited without finishing"
    write_status(folder, status="failed", returncode=returncode, error=reason, log_tail=tail,
                 failed=time.time(), pid=None)
    return "failed"


def stop(job: Launch, grace_s: float = 10.0) -> None:
    """Kill a cell's whole process group (the run and anything it started) and reap it."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(job.proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            job.proc.wait(grace_s)
            break
        except subprocess.TimeoutExpired:
            continue
    job.proc.wait()
    write_status(job.folder, status="interrupted", pid=None)
    job.lock.close()


# ---------------------------------------------------------------------------- local runner


class Progress:
    """One line per change: `[grid smoke] done 1 | running 1 | failed 0 | left 2`."""

    def __init__(self, name: str, done: int, failed: int, left: int):
        self.name, self.done, self.failed, self.left, self.running = name, done, failed, left, 0
        self.last = ""

    def show(self, event: str = "") -> None:
        line = (f"[grid {self.name}] done {self.done} | running {self.running} | "
                f"failed {self.failed} | left {self.left}")
        if line != self.last or event:
            print(line + (f"   ({event})" if event else ""), flush=True)
        self.last = line


def run_local(grid: Grid, grid_dir: Path, todo: list[Cell], progress: Progress, workers: int) -> dict:
    """Run cells with at most `workers` processes; SIGTERM/SIGINT kill every running cell."""
    pending, running, outcome = list(todo), {}, {}
    previous = signal.signal(signal.SIGTERM, _interrupt)
    progress.show()
    try:
        while pending or running:
            while pending and len(running) < workers:
                cell = pending.pop(0)
                job = launch(grid, cell, cell_dir(grid_dir, cell))
                progress.left -= 1
                if job is None:
                    outcome[cell.id] = "busy"
                    progress.show(f"{cell.id} is held by another runner; skipped")
                    continue
                running[cell.id] = job
                progress.running = len(running)
                progress.show(f"started {cell.id}")
            for cell_id, job in list(running.items()):
                code = job.proc.poll()
                if code is None:
                    continue
                del running[cell_id]
                job.lock.close()
                outcome[cell_id] = settle(job.folder, job.log_offset, code)
                progress.running = len(running)
                progress.done += outcome[cell_id] == "finished"
                progress.failed += outcome[cell_id] == "failed"
                progress.show(f"{outcome[cell_id]} {cell_id} in {time.time() - job.started:.0f} s")
            time.sleep(0.2)
    except KeyboardInterrupt:
        for cell_id, job in running.items():
            stop(job)
            outcome[cell_id] = "interrupted"
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    return outcome


def _interrupt(signum, frame):
    raise KeyboardInterrupt


# ---------------------------------------------------------------------------- SLURM (submitit)


def slurm_parameters(args, grid: Grid, cell: Cell) -> dict:
    """submitit `SlurmExecutor` parameters of one cell's job."""
    params = {"job_name": f"{grid.name}-{cell.id}", "time": args.slurm_time, "nodes": 1,
              "ntasks_per_node": 1, "cpus_per_task": args.slurm_cpus}
    optional = {"partition": args.slurm_partition, "gpus_per_node": args.slurm_gpus or None,
                "mem": f"{args.slurm_mem}GB" if args.slurm_mem else None,
                "account": args.slurm_account, "qos": args.slurm_qos,
                "constraint": args.slurm_constraint, "setup": args.slurm_setup or None}
    return {**params, **{k: v for k, v in optional.items() if v is not None}}


def slurm_script(params: dict, folder: Path) -> str:
    """The sbatch script submitit writes for a job with these parameters (nothing is submitted)."""
    from submitit.slurm.slurm import _make_sbatch_string

    command = f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(str(folder))}"
    return _make_sbatch_string(command=command, folder=folder, **params)


def run_cell_job(folder: str, command: list[str], threads: int) -> str:
    """Body of a cell's SLURM job: the cell's command, recorded like a local cell."""
    folder_path = Path(folder)
    attempts = int(read_status(folder_path).get("attempts", 0)) + 1
    with open(folder_path / "log.txt", "ab") as log:
        log.write(f"==== attempt {attempts} (slurm): {shlex.join(command)}\n".encode())
        log.flush()
        offset = log.tell()
        write_status(folder_path, attempts=attempts, returncode=None, error=None, log_tail=None)
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=_child_env(threads)).returncode
    if settle(folder_path, offset, code) != "finished":
        raise RuntimeError(f"cell {folder_path.name} failed: {read_status(folder_path).get('error')}")
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
    try:
        import submitit
    except ImportError as err:
        raise ConfigError("--launcher slurm: needs submitit (pip install -e '.[slurm]')") from err
    folder = grid_dir / "slurm" / "%j"
    jobs = {}
    for cell in todo:
        here = cell_dir(grid_dir, cell)
        if _slurm_active(folder, read_status(here).get("slurm_job_id")):
            print(f"[grid {grid.name}] {cell.id}: job {read_status(here)['slurm_job_id']} still queued or running")
            continue
        try:
            executor = submitit.SlurmExecutor(folder=folder)
        except RuntimeError as err:
            raise ConfigError(f"--launcher slurm: {err}") from err
        executor.update_parameters(**slurm_parameters(args, grid, cell))
        here.mkdir(parents=True, exist_ok=True)
        command = cell_command(grid, cell, here, args.slurm_cpus)
        job = executor.submit(run_cell_job, str(here), command, args.slurm_cpus)
        write_status(here, status="submitted", slurm_job_id=job.job_id,
                     grid=grid.name, cell=cell.id)
        jobs[cell.id] = job.job_id
        print(f"[grid {grid.name}] submitted {cell.id} as job {job.job_id}", flush=True)
    (grid_dir / "slurm").mkdir(parents=True, exist_ok=True)
    (grid_dir / "slurm" / "jobs.json").write_text(json.dumps(jobs, indent=2))
    return jobs


# ---------------------------------------------------------------------------- command line


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
    grid = load_grid(find_grid_file(args.file), args.overrides)
    grid_dir = Path(args.out or Path("runs") / "grids" / grid.name)
    states = {c.id: state(cell_dir(grid_dir, c)) for c in grid.cells}
    todo = [c for c in grid.cells if states[c.id] in ("new", "unfinished")
            or (states[c.id] == "failed" and args.retry_failed)]
    kept_failed = sum(states[c.id] == "failed" and not args.retry_failed for c in grid.cells)
    check_cells(grid)  # a bad cell stops the grid before any cell runs
    if args.dry_run:
        return _dry_run(grid, grid_dir, todo, states, args)
    grid_dir.mkdir(parents=True, exist_ok=True)
    (grid_dir / "grid.json").write_text(json.dumps(grid.manifest(), indent=2, default=str))
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
        print(f"  failed {cell.id}: {read_status(folder).get('error')}  (log: {folder / 'log.txt'})")
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
        scripts = [slurm_script(slurm_parameters(args, grid, c), grid_dir / "slurm" / "%j") for c in todo]
        print(f"# sbatch script of {todo[0].id} ({len(scripts)} jobs would be submitted):")
        print(scripts[0])
    return 0


