"""`oisd-lab launch`: the sbatch script of one multi-node run, its submission through `sbatch`
(a stand-in on PATH that records what it was given), and one-line errors that write nothing.
The script itself runs under a simulated two-node allocation in tests/test_fsdp_cli.py."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pytest

from oisd_lab.cli import main


def fake_tools(folder: Path, job_id: str = "4242", queued: str = "") -> Path:
    """`sbatch` that records its arguments and the script it was given, and `squeue` that reports `queued`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sbatch").write_text(f'#!/bin/bash\necho "$@" > "{folder}/sbatch.args"\ncp "$2" "{folder}/submitted"\n'
                                   f'echo "{job_id};cluster"\n')
    (folder / "squeue").write_text(f'#!/bin/bash\necho "$@" > "{folder}/squeue.args"\nprintf "{queued}"\n')
    for tool in ("sbatch", "squeue"):
        (folder / tool).chmod(0o755)
    return folder


@pytest.fixture()
def path_with(monkeypatch, tmp_path):
    def use(folder: Path | None) -> None:
        monkeypatch.setenv("PATH", f"{folder}:/usr/bin:/bin" if folder else "/nonexistent")
    monkeypatch.chdir(tmp_path)
    return use


def launch(*args: str) -> int:
    return main(["launch", *args])


def test_dry_run_prints_one_srun_over_the_allocation_and_writes_nothing(path_with, tmp_path, capsys):
    path_with(None)
    rc = launch("--nodes", "2", "--gpus-per-node", "8", "--partition", "gpu", "--time", "600", "--account", "rl",
                "--setup", "module load cuda", "--config", "paper/qwen3-4b-oisd", "run_dir=runs/q", "seed=3",
                "--dry-run")
    out = capsys.readouterr()
    assert rc == 0, out.err
    lines = out.out.splitlines()
    assert lines[0] == "#!/bin/bash"
    directives = dict(line.removeprefix("#SBATCH --").split("=", 1) for line in lines if line.startswith("#SBATCH"))
    assert directives == {"job-name": "oisd-q", "nodes": "2", "ntasks-per-node": "8", "gpus-per-node": "8",
                          "cpus-per-task": "8", "time": "600", "partition": "gpu", "account": "rl",
                          "chdir": str(tmp_path), "output": f"{tmp_path}/runs/q/slurm/%j.out"}
    assert "module load cuda" in lines
    command = shlex.split(lines[-1])
    assert command[:6] == ["srun", sys.executable, "-m", "oisd_lab", "train", "--config"]
    assert command[6:] == ["paper/qwen3-4b-oisd", "seed=3", "num_nodes=2", "devices=8", "num_threads=8",
                           f"run_dir={tmp_path}/runs/q"]
    assert [line for line in lines if line.startswith("srun")] == [lines[-1]]
    assert not (tmp_path / "runs").exists()
    assert "not submitted" in out.err


def test_the_run_folder_is_fixed_at_launch(path_with, tmp_path, capsys):
    """Every task must write to one folder: without run_dir the default (which carries the time) is
    resolved once, here, and the command names it."""
    path_with(None)
    assert launch("--nodes", "2", "debug=quick", "accelerator=cpu", "strategy=fsdp", "--dry-run") == 0
    command = shlex.split(capsys.readouterr().out.splitlines()[-1])
    run_dir = next(a.removeprefix("run_dir=") for a in command if a.startswith("run_dir="))
    assert Path(run_dir).parent == tmp_path / "runs" and Path(run_dir).name.startswith("arith-grpo-s0-")
    assert "--config" not in command and "devices=1" in command and "num_nodes=2" in command


def test_submission_writes_the_script_into_the_run_folder_and_records_the_job(path_with, tmp_path, capsys):
    tools = fake_tools(tmp_path / "bin")
    path_with(tools)
    args = ("--nodes", "2", "--gpus-per-node", "4", "accelerator=gpu", "strategy=fsdp", "run_dir=runs/a")
    assert launch(*args, "--dry-run") == 0
    shown = capsys.readouterr().out
    assert launch(*args) == 0
    out = capsys.readouterr().out.splitlines()
    run = tmp_path / "runs" / "a"
    assert out == [f"submitted job 4242: 2 node(s) x 4 rank(s); log {run}/slurm/4242.out", str(run)]
    assert (run / "slurm" / "launch-1.sbatch").read_text() == shown == (tools / "submitted").read_text()
    assert (tools / "sbatch.args").read_text().split() == ["--parsable", str(run / "slurm" / "launch-1.sbatch")]
    assert json.loads((run / "slurm" / "jobs.json").read_text()) == ["4242"]
    # the same command again, once the job has ended (squeue reports nothing): a second job resumes the run
    assert launch(*args) == 0
    assert json.loads((run / "slurm" / "jobs.json").read_text()) == ["4242", "4242"]
    assert (run / "slurm" / "launch-2.sbatch").is_file()
    assert (tools / "squeue.args").read_text().split() == ["-h", "-j", "4242", "-o", "%T"]


def test_a_launch_while_the_runs_job_is_queued_is_refused_and_loses_nothing(path_with, tmp_path, capsys):
    path_with(fake_tools(tmp_path / "bin"))
    args = ("--nodes", "2", "debug=quick", "accelerator=cpu", "run_dir=runs/b")
    assert launch(*args) == 0
    path_with(fake_tools(tmp_path / "bin2", job_id="99", queued="PENDING\n"))
    capsys.readouterr()
    assert launch(*args) == 2
    assert capsys.readouterr().err == (f"error: run_dir: job 4242 of {tmp_path}/runs/b is still pending; "
                                       "wait for it or `scancel 4242` before launching the run again\n")
    assert json.loads((tmp_path / "runs" / "b" / "slurm" / "jobs.json").read_text()) == ["4242"]
    assert not (tmp_path / "runs" / "b" / "slurm" / "launch-2.sbatch").exists()
    assert not (tmp_path / "bin2" / "sbatch.args").exists()


@pytest.mark.parametrize("args, message", [
    (["--nodes", "2", "devices=4"], "devices: set by `oisd-lab launch` from --gpus-per-node / --ranks-per-node; drop devices=4"),
    (["--nodes", "2", "num_nodes=2"], "num_nodes: set by `oisd-lab launch` from --nodes; drop num_nodes=2"),
    (["--nodes", "0"], "--nodes: must be a whole number of nodes >= 1, got 0"),
    (["--nodes", "1", "--gpus-per-node", "2", "--ranks-per-node", "4"],
     "--ranks-per-node: 4 ranks on 2 GPUs per node; each rank needs its own GPU, pass --ranks-per-node 2 or fewer"),
    (["--nodes", "2", "--gpus-per-node", "8", "accelerator=cpu"],
     "accelerator: 'cpu' with --gpus-per-node 8; pass accelerator=gpu, or --gpus-per-node 0 for CPU ranks"),
    (["--nodes", "2", "--config", "paper/qwen3-4b-oisd"],
     "accelerator: 'gpu' but --gpus-per-node is 0; pass --gpus-per-node N (GPUs per node)"),
    (["--nodes", "2", "method=oisdd"], None),
])
def test_bad_input_is_one_line_naming_the_field_before_anything_is_written(path_with, tmp_path, capsys, args, message):
    path_with(fake_tools(tmp_path / "bin"))
    assert launch(*args, "run_dir=runs/c") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    if message:
        assert err == f"error: {message}\n"
    else:
        assert "method" in err and "oisdd" in err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "bin" / "sbatch.args").exists()


def test_without_sbatch_the_error_names_the_login_node_and_dry_run(path_with, tmp_path, capsys):
    path_with(None)
    assert launch("--nodes", "2", "debug=quick", "accelerator=cpu", "run_dir=runs/d") == 2
    assert capsys.readouterr().err == ("error: sbatch: not found on PATH; run `oisd-lab launch` on the cluster's "
                                       "login node, or add --dry-run to print the script\n")
    assert not (tmp_path / "runs").exists()
