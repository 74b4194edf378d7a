"""`oisd-lab train debug=quick method=oisd accelerator=cpu devices=2 strategy=fsdp` as a user runs it
(the CLI entry point in a subprocess; Lightning starts the second rank, FSDP2 over gloo), with
only size overrides: every step is logged once, gradients flow, the weights move, and the exported
final model (full weights, `from_pretrained`) is the last checkpoint's parameters. The same run
killed with SIGKILL (every rank at once, as when a job is cancelled) after a checkpoint and started
again with the same command ends where the uninterrupted run ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

STEPS = 3
SIZE = (f"max_steps={STEPS}", "checkpoint_every=1", "task.num_test=4", "eval.k=1", "grpo.max_completion_length=16",
        "num_threads=1", "log.wandb_mode=disabled")
VOLATILE = ("time/", "step_time")


def command(run: Path, *extra: str) -> list[str]:
    overrides = tiny_overrides(run, "method=oisd", "accelerator=cpu", "devices=2", "strategy=fsdp", *SIZE, *extra)
    return [sys.executable, "-m", "oisd_lab", "train", *overrides]


def environment(cache: Path) -> dict:
    return {**os.environ, "OISD_LAB_CACHE": str(cache), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def stable(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith(VOLATILE)}


@pytest.fixture(scope="module")
def reference(cache_dir, tmp_path_factory) -> Path:
    """The run, never interrupted, with its memory plan and each rank's measured peaks."""
    run = tmp_path_factory.mktemp("fsdp_cli") / "run"
    done = subprocess.run(command(run, "log.plan=true"), env=environment(cache_dir), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == str(run)
    return run


def test_sharded_cli_run_logs_every_step_once_and_trains(reference, cache_dir):
    from transformers import AutoModelForCausalLM

    from oisd_lab.config import compose
    from oisd_lab.pretrain import warm_start

    assert json.loads((reference / "status.json").read_text())["status"] == "finished"
    metrics = rows(reference / "metrics.jsonl")
    assert [r["step"] for r in metrics] == list(range(1, STEPS + 1))  # rank 1 logs nothing
    assert all(r["grad_norm"] > 1e-3 and r["grad/policy/norm"] > 1e-3 for r in metrics), \
        [(r["grad_norm"], r.get("grad/policy/norm")) for r in metrics]
    assert any(r["frac_reward_zero_std"] < 1 for r in metrics)
    assert all(r["grad/think/norm"] > 0 for r in metrics)  # the alignment channel reached the weights too

    cfg = compose(tiny_overrides(reference, "method=oisd"))
    start = load_file(warm_start(cfg) / "model.safetensors")
    final = AutoModelForCausalLM.from_pretrained(reference / "final_model").state_dict()
    moved = max((final[k].float() - start[k].float()).abs().max().item() for k in start)
    # Adam moves a coordinate by lr on its first step (m/sqrt(v) = sign(g)); up to about lr per step
    # after (no warm-up, no weight decay); measured 3.0 lr after 3 steps
    lr = cfg.grpo.lr
    assert cfg.grpo.warmup_steps == 0 and cfg.grpo.weight_decay == 0
    assert 0.9 * lr < moved < 1.1 * STEPS * lr, (moved, lr)
    ckpt = torch.load(reference / "checkpoints" / f"step={STEPS}.ckpt", map_location="cpu", weights_only=False)
    params = {k.removeprefix("policy."): v for k, v in ckpt["state_dict"].items()}
    assert ckpt["global_step"] == STEPS
    assert [k for k in start if not torch.equal(final[k], params[k])] == []


def test_each_ranks_measured_peak_is_within_10_percent_of_the_plan(reference):
    """`log.plan=true` on 2 CPU ranks: both ranks measure their phases of the first two steps
    (tensor bytes: parameters, gradients and optimizer state held, plus the profiler's peak inside
    each phase); the run's peak (the policy step) is within 10% of the planned peak on each."""
    plan = json.loads((reference / "plan.json").read_text())
    assert plan["setup"]["strategy"] == "fsdp" and plan["setup"]["world"] == 2
    for name in ("memory.json", "memory.rank1.json"):
        phases = json.loads((reference / name).read_text())["phases"]
        assert {"rollout", "policy step"} <= set(phases), (name, phases)
        assert all(row["planned_bytes"] == plan["phases"][k]["total"] for k, row in phases.items())
        peak = max(row["measured_bytes"] for row in phases.values())
        assert abs(peak / plan["peak_bytes"] - 1) < 0.10, (name, peak, plan["peak_bytes"], phases)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 400.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before writing {path.name}"
        assert time.monotonic() < deadline, f"no {path.name} after {timeout} s"
        time.sleep(0.01)


def test_sharded_run_killed_after_a_checkpoint_resumes_to_the_same_end(reference, cache_dir, tmp_path):
    run = tmp_path / "run"
    log = open(tmp_path / "killed.log", "w")
    # its own session: SIGKILL reaches both ranks (Lightning's rank 1 is a child of rank 0)
    proc = subprocess.Popen(command(run), env=environment(cache_dir), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        _wait_for(run / "checkpoints" / "step=1.ckpt", proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        log.close()
    assert proc.returncode == -9
    assert json.loads((run / "status.json").read_text())["status"] == "running"
    assert not (run / "final_model").exists()
    assert (run / "checkpoints" / "step=1.ckpt").is_file() and not (run / "checkpoints" / f"step={STEPS}.ckpt").exists()

    again = subprocess.run(command(run), env=environment(cache_dir), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    metrics, want = rows(run / "metrics.jsonl"), rows(reference / "metrics.jsonl")
    assert [r["step"] for r in metrics] == list(range(1, STEPS + 1))
    assert [stable(r) for r in metrics] == [stable(r) for r in want]
    assert rows(run / "completions.jsonl") == rows(reference / "completions.jsonl")
    got, ref = load_file(run / "final_model" / "model.safetensors"), load_file(reference / "final_model" / "model.safetensors")
    assert got.keys() == ref.keys()
    assert [k for k in ref if not torch.equal(got[k], ref[k])] == []
    assert json.loads((run / "status.json").read_text())["status"] == "finished"


def test_logging_steps_without_the_gradient_view_train_as_with_it(reference, cache_dir, tmp_path):
    """`log.gradient_view=false`: the logging pass (rank 0) and the rollouts run forwards that no
    backward follows, and the step's backward then runs FSDP's own per-layer gathers. Those forwards
    once made the ranks prefetch different layers and wait on each other forever at step 1. The
    run ends as the reference ends after the same 2 steps (the view only reads the gradients)."""
    run = tmp_path / "run"
    cmd = [*command(run), "max_steps=2", "log.gradient_view=false"]
    done = subprocess.run(cmd, env=environment(cache_dir), capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = rows(run / "metrics.jsonl")
    assert [r["step"] for r in metrics] == [1, 2] and not any("grad/policy/norm" in r for r in metrics)
    want = rows(reference / "metrics.jsonl")[:2]
    assert [r["reward"] for r in metrics] == [r["reward"] for r in want]
    for got, ref in zip(metrics, want, strict=True):
        assert abs(got["grad_norm"] - ref["grad_norm"]) < 1e-4 * ref["grad_norm"], (got["grad_norm"], ref["grad_norm"])
    ckpt = torch.load(reference / "checkpoints" / "step=2.ckpt", map_location="cpu", weights_only=False)
    ref = {k.removeprefix("policy."): v for k, v in ckpt["state_dict"].items()}
    got = load_file(run / "final_model" / "model.safetensors")
    # measured: equal to 1e-8 after two Adam steps of lr 3e-5
    assert max((got[k] - ref[k]).abs().max().item() for k in got) < 1e-6


FAKE_SRUN = """#!/bin/bash
# srun of a simulated allocation on this machine: SLURM_NNODES nodes x SLURM_NTASKS_PER_NODE tasks, each
# task started with the variables a real srun sets for it
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do
  for ((local = 0; local < SLURM_NTASKS_PER_NODE; local++)); do
    SLURM_PROCID=$((node * SLURM_NTASKS_PER_NODE + local)) SLURM_LOCALID=$local SLURM_NODEID=$node "$@" &
    pids+=($!)
  done
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""


def test_the_launch_script_under_a_simulated_two_node_allocation_ends_where_one_node_ends(reference, cache_dir,
                                                                                         tmp_path):
    """`oisd-lab launch --nodes 2` (one CPU rank per node) writes the sbatch script; the script runs
    under a stand-in `srun` that starts its two tasks as SLURM would on two nodes (SLURM_PROCID,
    SLURM_NODEID, ...; the rendezvous from SLURM_NODELIST and the job id). Each task takes its rank
    from SLURM (without it, num_nodes=2 with one device would wait for a second node forever), and
    the run ends bit for bit where the one-node, two-rank reference ends."""
    import random

    run, tools = tmp_path / "run", tmp_path / "bin"
    tools.mkdir()
    (tools / "sbatch").write_text('#!/bin/bash\necho 1\n')
    (tools / "srun").write_text(FAKE_SRUN)
    for tool in ("sbatch", "srun"):
        (tools / tool).chmod(0o755)
    overrides = [o for o in command(run)[4:] if o not in ("devices=2", "num_threads=1")]
    env = {**environment(cache_dir), "PATH": f"{tools}:{os.environ['PATH']}"}
    done = subprocess.run([sys.executable, "-m", "oisd_lab", "launch", "--nodes", "2", "--cpus-per-task", "1",
                           *overrides], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    script = run / "slurm" / "launch-1.sbatch"
    assert "num_nodes=2 devices=1 num_threads=1" in script.read_text()
    job = str(random.randrange(10_000, 99_999))  # its last 4 digits set the rendezvous port
    allocation = {"SLURM_JOB_ID": job, "SLURM_JOB_NAME": f"oisd-{run.name}", "SLURM_NNODES": "2",
                  "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "1", "SLURM_NODELIST": "localhost"}
    ran = subprocess.run(["bash", str(script)], env={**env, **allocation}, capture_output=True, text=True,
                         timeout=600, cwd=tmp_path)
    assert ran.returncode == 0, (ran.stdout + ran.stderr)[-3000:]
    metrics, want = rows(run / "metrics.jsonl"), rows(reference / "metrics.jsonl")
    assert [r["step"] for r in metrics] == list(range(1, STEPS + 1))
    assert [stable(r) for r in metrics] == [stable(r) for r in want]
    got, ref = load_file(run / "final_model" / "model.safetensors"), load_file(reference / "final_model" / "model.safetensors")
    assert got.keys() == ref.keys() and [k for k in ref if not torch.equal(got[k], ref[k])] == []
