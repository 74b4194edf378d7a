"""W&B across a resume: the transaction-log reader against a hand-written log, and a run killed
after a checkpoint and resumed whose W&B folders together hold every training step once."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
from conftest import tiny_overrides

from oisd_lab.run.wandb_history import BLOCK, history, last_logged_step, read_records, run_logs


def _write_log(path: Path, payloads: list[bytes]) -> None:
    """A naive LevelDB-log writer (the format of `.wandb` files), splitting records at block ends."""
    out = bytearray(b":W&B" + struct.pack("<HB", 0xBEE1, 0))
    for payload in payloads:
        rest, first = payload, True
        while True:
            left = BLOCK - len(out) % BLOCK
            if left < 7:
                out += b"\0" * left
                continue
            chunk, rest = rest[:left - 7], rest[left - 7:]
            kind = (1 if first else 4) if not rest else (2 if first else 3)
            out += struct.pack("<IHB", zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF, len(chunk), kind)
            out += chunk
            first = False
            if not rest:
                break
    path.write_bytes(bytes(out))


def _history_record(step: int, **values) -> bytes:
    from wandb.proto import wandb_internal_pb2

    record = wandb_internal_pb2.Record()
    record.history.step.num = step
    for key, value in values.items():
        item = record.history.item.add()
        item.key, item.value_json = key, json.dumps(value)
    return record.SerializeToString()


def test_reader_reassembles_records_across_blocks_and_stops_at_a_torn_tail(tmp_path):
    big = "x" * (BLOCK + 5000)  # one record in FIRST, MIDDLE and LAST chunks
    payloads = [_history_record(1, loss=0.5), _history_record(2, note=big), _history_record(3, loss=0.25)]
    path = tmp_path / "run-abc.wandb"
    _write_log(path, payloads)
    assert [r.history.step.num for r in read_records(path)] == [1, 2, 3]
    rows = history(path)
    assert rows[0] == {"loss": 0.5, "_step": 1} and rows[1]["note"] == big and rows[2]["loss"] == 0.25
    path.write_bytes(path.read_bytes()[:-3])  # killed mid-write: the last record is torn
    assert [row["_step"] for row in history(path)] == [1, 2]
    data = bytearray(path.read_bytes())
    data[20] ^= 0xFF  # a flipped byte in the first record: its checksum fails, nothing after it is trusted
    path.write_bytes(bytes(data))
    assert history(path) == []


def test_last_logged_step_over_the_folders_of_one_run_id(tmp_path):
    for name, steps in (("run-20260101_000100-abc", [4, 5]), ("offline-run-20260101_000000-abc", [1, 2, 3]),
                        ("offline-run-20260101_000200-other", [9])):
        (tmp_path / name).mkdir()
        _write_log(tmp_path / name / f"run-{name.rsplit('-', 1)[1]}.wandb", [_history_record(s) for s in steps])
    assert [p.parent.name for p in run_logs(tmp_path, "abc")] == ["offline-run-20260101_000000-abc",
                                                                "run-20260101_000100-abc"]  # by start time
    assert last_logged_step(tmp_path, "abc") == 5
    assert last_logged_step(tmp_path, "none") == -1


STEPS = 8
EXTRA = (f"max_steps={STEPS}", "checkpoint_every=2", "num_threads=1", "log.wandb_mode=offline")


def _wait_for_step(metrics: Path, step: int, proc: subprocess.Popen, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before step {step}"
        assert time.monotonic() < deadline, f"no step {step} after {timeout} s"
        if metrics.is_file() and any(json.loads(line)["step"] >= step for line in metrics.read_text().splitlines()
                                     if line.endswith("}")):
            return
        time.sleep(0.01)


@pytest.mark.slow
def test_killed_and_resumed_run_has_every_step_once_across_its_wandb_folders(cache_dir, tmp_path):
    run = tmp_path / "run"
    command = [sys.executable, "-m", "oisd_lab", "train", *tiny_overrides(run, *EXTRA)]
    env = {**os.environ, "OISD_LAB_CACHE": str(cache_dir), "WANDB_MODE": "offline"}
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        _wait_for_step(run / "metrics.jsonl", 5, proc)  # a checkpoint at 4, at least one step after it
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    time.sleep(2)  # W&B's writer process outlives the trainer for a moment and flushes what it has
    run_id = json.loads((run / "status.json").read_text())["run_id"]
    first = run_logs(run / "wandb", run_id)
    assert len(first) == 1
    killed_steps = [row["_step"] for row in history(first[0])]

    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    logs = run_logs(run / "wandb", run_id)
    assert len(logs) == 2 and logs[0] == first[0]  # one folder per start, the same run id
    rows = [row for path in logs for row in history(path)]
    steps = [row["_step"] for row in rows]
    assert steps == list(range(1, STEPS + 1)), (killed_steps, steps)  # every step once, in order
    assert all(row["trainer/global_step"] == row["_step"] for row in rows)
    # the values uploaded for each step are the local table's (resume is exact; times excepted)
    table = {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    for row in rows:
        assert row["reward"] == pytest.approx(table[row["_step"]]["reward"])
        assert row["loss/policy"] == pytest.approx(table[row["_step"]]["loss/policy"], nan_ok=True)
    resumed_steps = [row["_step"] for row in history(logs[1])]
    assert resumed_steps and min(resumed_steps) == max(killed_steps, default=0) + 1
