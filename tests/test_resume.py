"""Resume: a run killed with SIGKILL after a checkpoint, run again with the same command, ends
exactly where an uninterrupted run ends (same parameters bit for bit, every logged step once);
damaged checkpoints are passed over with a warning and the previous one is used."""

from __future__ import annotations

import json
import os
import shutil
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

STEPS, EVERY = 6, 2
LOGGED = [1, 2, 4, 6]  # log.every_n_steps=2, plus the first and the last step
EXTRA = (f"max_steps={STEPS}", f"checkpoint_every={EVERY}", "method=oisd", "method.weighting=uniform",
         "grpo.lr=1e-3", "num_threads=1", "log.wandb_mode=disabled")
"""Uniform alignment weights give every step a non-zero update whatever the rewards, so the
comparison covers model, optimizer (Adam moments) and scheduler state."""
VOLATILE = ("time/", "step_time")


def overrides(run: Path) -> list[str]:
    return tiny_overrides(run, *EXTRA)


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def stable(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith(VOLATILE)}


def final_tensors(run: Path) -> dict:
    return load_file(run / "final_model" / "model.safetensors")


def assert_same_run(run: Path, ref: Path) -> None:
    got, want = final_tensors(run), final_tensors(ref)
    assert got.keys() == want.keys()
    different = [k for k in want if not torch.equal(got[k], want[k])]
    assert different == []
    metrics = rows(run / "metrics.jsonl")
    assert [r["step"] for r in metrics] == list(range(1, STEPS + 1))
    assert [stable(r) for r in metrics] == [stable(r) for r in rows(ref / "metrics.jsonl")]
    completions = rows(run / "completions.jsonl")
    assert [r["step"] for r in completions] == [s for s in LOGGED for _ in range(16)]
    assert completions == rows(ref / "completions.jsonl")
    assert [r["step"] for r in rows(run / "diagnostics.jsonl")] == [r["step"] for r in rows(ref / "diagnostics.jsonl")]
    assert json.loads((run / "status.json").read_text())["status"] == "finished"


@pytest.fixture(scope="module")
def reference(cache_dir, tmp_path_factory) -> Path:
    """The same run, never interrupted."""
    from oisd_lab.config import compose
    from oisd_lab.train import train

    run = tmp_path_factory.mktemp("reference") / "run"
    train(compose(overrides(run)), log=lambda *_: None)
    return run


def test_reference_run_trains_and_checkpoints(reference, cache_dir):
    from oisd_lab.config import compose
    from oisd_lab.pretrain import warm_start

    start = warm_start(compose(overrides(reference))) / "model.safetensors"
    before, after = load_file(start), final_tensors(reference)
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the comparison is not trivial
    names = sorted(p.name for p in (reference / "checkpoints").iterdir())
    assert names == ["last.ckpt", "last.ckpt.sha256", "step=4.ckpt", "step=4.ckpt.sha256",
                     "step=6.ckpt", "step=6.ckpt.sha256"]


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before writing {path.name}"
        assert time.monotonic() < deadline, f"no {path.name} after {timeout} s"
        time.sleep(0.01)


@pytest.mark.parametrize("sig, rc, status", [
    pytest.param(signal.SIGKILL, -9, "running", id="SIGKILL"),
    pytest.param(signal.SIGTERM, 143, "interrupted", id="SIGTERM"),
])
def test_killed_after_a_checkpoint_then_the_same_command_resumes_exactly(sig, rc, status, reference, cache_dir,
                                                                        tmp_path):
    """SIGKILL: nothing runs after the signal. SIGTERM (preemption): Lightning stops between steps,
    the status says interrupted and the exit status is 143, not 0."""
    run = tmp_path / "run"
    command = [sys.executable, "-m", "oisd_lab", "train", *overrides(run)]
    env = {**os.environ, "OISD_LAB_CACHE": str(cache_dir)}
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    _wait_for(run / "checkpoints" / "step=2.ckpt", proc)
    proc.send_signal(sig)
    proc.wait(timeout=120)
    log.close()
    assert proc.returncode == rc, (tmp_path / "killed.log").read_text()[-2000:]
    assert json.loads((run / "status.json").read_text())["status"] == status
    assert not (run / "final_model").exists()
    killed_at = [r["step"] for r in rows(run / "metrics.jsonl")]
    assert killed_at[:2] == [1, 2]

    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.strip().splitlines()[-1] == str(run)
    assert_same_run(run, reference)
    # the resumed process left one more checkpoint set, and nothing half-written
    assert not [p for p in (run / "checkpoints").iterdir() if ".tmp" in p.name]


def test_damaged_checkpoints_are_skipped_with_a_warning_and_the_previous_one_is_used(reference, tmp_path):
    from oisd_lab.config import compose
    from oisd_lab.run.checkpointing import CheckpointWarning
    from oisd_lab.train import train

    run = tmp_path / "run"
    shutil.copytree(reference, run)
    shutil.rmtree(run / "final_model")
    (run / "eval.json").unlink()
    last, newest = run / "checkpoints" / "last.ckpt", run / "checkpoints" / "step=6.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # torn write
    data = bytearray(newest.read_bytes())  # bit rot inside the tensors: it still loads, only the digest tells
    mid = len(data) // 2
    data[mid : mid + 64] = bytes(b ^ 0x01 for b in data[mid : mid + 64])
    newest.write_bytes(bytes(data))

    with pytest.warns(CheckpointWarning) as caught:
        train(compose(overrides(run)), log=lambda *_: None)
    messages = [str(w.message) for w in caught]
    assert any(f"checkpoint {last} is damaged" in m and "does not load" in m for m in messages)
    assert any(f"checkpoint {newest} is damaged" in m and "SHA-256" in m for m in messages), messages
    assert_same_run(run, reference)
    names = sorted(p.name for p in (run / "checkpoints").glob("*.ckpt"))
    assert names == ["last.ckpt", "step=4.ckpt", "step=6.ckpt"]  # damaged files overwritten, no -v1 copies
    for path in (last, newest):
        assert torch.load(path, weights_only=False, mmap=True)["global_step"] == STEPS


def test_a_run_stopped_after_its_last_checkpoint_only_finishes(reference, tmp_path):
    """Killed between the last step and the final model: the rerun trains nothing and finishes."""
    from oisd_lab.config import compose
    from oisd_lab.train import train

    run = tmp_path / "run"
    shutil.copytree(reference, run)
    shutil.rmtree(run / "final_model")
    (run / "eval.json").unlink()
    (run / "status.json").write_text(json.dumps({"status": "running", "run_id": "x"}))
    mtimes = {p.name: p.stat().st_mtime_ns for p in (run / "checkpoints").iterdir()}
    train(compose(overrides(run)), log=lambda *_: None)
    assert_same_run(run, reference)
    assert {p.name: p.stat().st_mtime_ns for p in (run / "checkpoints").iterdir()} == mtimes
    assert json.loads((run / "eval.json").read_text())["steps"] == STEPS
