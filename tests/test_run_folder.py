"""The run-folder format: status.json writes, the tolerant readers, and the names a run's readers
and writers share."""

from __future__ import annotations

import json

from oisd_lab.run.folder import RunDir, cell_folder, cell_folders, read_json, read_jsonl


def test_status_writes_merge_and_none_removes_a_field(tmp_path):
    run = RunDir(tmp_path)
    run.write_status(status="failed", error="boom", attempts=1)
    run.write_status(status="running", error=None)
    status = json.loads((tmp_path / "status.json").read_text())
    assert {k: v for k, v in status.items() if k != "updated"} == {"status": "running", "attempts": 1}
    assert isinstance(status["updated"], float)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["status.json"]  # no temporary file left


def test_readers_skip_torn_lines_and_missing_files(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "reward": 0.5}\n\n{"step": 2, "reward": 0.25}\n{"step": 3, "rew')
    assert read_jsonl(path) == [{"step": 1, "reward": 0.5}, {"step": 2, "reward": 0.25}]
    assert read_jsonl(tmp_path / "absent.jsonl") == []
    (tmp_path / "eval.json").write_text('{"before": ')
    assert read_json(tmp_path / "eval.json") == {} and read_json(tmp_path / "absent.json") == {}
    assert RunDir(tmp_path / "absent").read_status() == {}


def test_snapshots_are_listed_by_step(tmp_path):
    run = RunDir(tmp_path)
    run.snapshots.mkdir()
    for step in (10, 2, 100):
        run.snapshot(step).write_text("{}")
    (run.snapshots / "notes.json").write_text("{}")
    assert run.snapshot(2).name == "step_000002.json"
    assert run.snapshot_steps() == [2, 10, 100]


def test_cell_folders_are_the_run_folders_under_cells(tmp_path):
    for cell in ("b-run", "a-run", "not-started"):
        cell_folder(tmp_path, cell).mkdir(parents=True)
    for cell in ("b-run", "a-run"):
        RunDir(cell_folder(tmp_path, cell)).config.write_text("seed: 0\n")
    assert cell_folders(tmp_path) == [tmp_path / "cells" / "a-run", tmp_path / "cells" / "b-run"]


def test_jsonl_rows_append_and_trim_to_a_step_atomically(tmp_path):
    from oisd_lab.files import append_jsonl, truncate_jsonl
    from oisd_lab.run.tracking import TableLogger

    path = tmp_path / "metrics.jsonl"
    append_jsonl(path, [{"step": s, "text": "é\n"} for s in (1, 2, 3)])
    with open(path, "a") as handle:
        handle.write('{"step": 4, "tor')  # a writer killed mid-line
    assert truncate_jsonl(path, 2) == 2
    assert read_jsonl(path) == [{"step": 1, "text": "é\n"}, {"step": 2, "text": "é\n"}]
    path.read_bytes().decode("ascii")  # escaped: one line per row whatever the text
    # the metrics table trims the same way on resume, and appends after it
    append_jsonl(path, [{"step": 3}])
    logger = TableLogger(path, resume_step=2)
    logger.log_metrics({"loss": 0.5}, step=3)
    assert [r["step"] for r in read_jsonl(path)] == [1, 2, 3] and read_jsonl(path)[-1] == {"step": 3, "loss": 0.5}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no temporary file left
