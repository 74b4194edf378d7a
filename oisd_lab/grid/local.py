"""Cell folders and the local runner: each cell is one `oisd-lab train` process in its own
process group, with its status, log and retries kept in its folder."""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..run.folder import RunDir, cell_folder
from .spec import Cell, Grid, hydra_value, override_key

TAIL_LINES = 20


def cell_dir(grid_dir: Path, cell: Cell) -> Path:
    return cell_folder(grid_dir, cell.id)


def state(folder: Path) -> str:
    """finished, failed, new (never started) or unfinished (running, interrupted, submitted)."""
    status = RunDir(folder).read_status().get("status")
    return status if status in ("finished", "failed") else ("new" if status is None else "unfinished")


def cell_command(grid: Grid, cell: Cell, folder: Path, threads: int = 1) -> list[str]:
    """The `train` command of a cell; grid-set keys are added unless the grid file sets them."""
    keys = {override_key(o) for o in cell.overrides}
    extra = [f"run_dir={hydra_value(str(Path(folder).resolve()))}"]
    defaults = {"num_threads": str(threads), "log.wandb_group": hydra_value(grid.name),
                "log.tags": hydra_value(cell.tags(grid.name))}
    extra += [f"{k}={v}" for k, v in defaults.items() if k not in keys]
    return [sys.executable, "-m", "oisd_lab", "train", *cell.overrides, *extra]


def child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env.setdefault("WANDB_MODE", "offline")
    # A W&B service started in this process (a notebook, say) must not be shared by the cells:
    # a killed cell's run id would stay "in use" there, and its resumed start would fail.
    env.pop("WANDB_SERVICE", None)
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
    run = RunDir(folder)
    lock = open(run.lock, "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        return None
    command = cell_command(grid, cell, folder, threads)
    run.cell_info.write_text(json.dumps({**asdict(cell), "grid": grid.name, "command": shlex.join(command)},
                                        indent=2))
    attempts = int(run.read_status().get("attempts", 0)) + 1
    run.write_status(status="starting", attempts=attempts, grid=grid.name, cell=cell.id,
                     returncode=None, error=None, log_tail=None, failed=None)
    with open(run.log, "ab") as log:
        log.write(f"==== attempt {attempts}, {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                  f"{shlex.join(command)}\n".encode())
        log.flush()
        offset = log.tell()
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=child_env(threads), start_new_session=True, preexec_fn=_die_with_parent)
    run.write_status(pid=proc.pid)  # the child's first status write comes seconds later
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
    run = RunDir(folder)
    if returncode == 0 and run.read_status().get("status") == "finished":
        run.write_status(pid=None)
        return "finished"
    tail = _tail(run.log, log_offset)
    reason = f"killed by signal {-returncode}" if returncode < 0 else (tail[-1] if tail else "no output")
    if returncode == 0:
        reason = "exited without finishing"
    run.write_status(status="failed", returncode=returncode, error=reason, log_tail=tail,
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
    RunDir(job.folder).write_status(status="interrupted", pid=None)
    job.lock.close()


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
