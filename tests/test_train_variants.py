"""`oisd-lab train` on the embedded default with each GRPO-family option and with method=bupo,
and, with two updates per batch at a large learning rate, a ratio that leaves 1 and a clip that acts."""

from __future__ import annotations

import json
import math
import zlib

import pytest
from conftest import assert_gradients_flowed, tiny_overrides

from oisd_lab.cli import main
from oisd_lab.sources import TaskSource

pytestmark = pytest.mark.slow


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("options", [
    ["grpo.num_iterations=2"],
    ["grpo.importance_sampling_level=sequence", "grpo.loss_type=grpo", "grpo.num_iterations=2"],
    ["grpo.loss_type=cispo", "grpo.epsilon_high=5.0"],
    ["grpo.loss_type=sapo"],
    ["grpo.mask_truncated_completions=true"],
    ["method=bupo"],
    ["method=bupo", "method.bupo_final_norm=true", "grpo.num_iterations=3"],
], ids=lambda o: "-".join(x.split(".")[-1] for x in o))
def test_train_runs_with_each_option(tmp_path, cache_dir, options):
    run_dir = tmp_path / "run"
    assert main(["train", *tiny_overrides(run_dir, "log.wandb_mode=disabled", *options)]) == 0
    rows = _rows(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert math.isfinite(r["loss/policy"]) and r["importance_ratio/mean"] > 0
    assert_gradients_flowed(rows)
    assert json.loads((run_dir / "status.json").read_text())["status"] == "finished"


def test_two_iterations_at_a_large_lr_move_the_ratio_and_clip(tmp_path, cache_dir, monkeypatch):
    # a reward that splits groups whatever the policy writes (a checksum bit of the text, so two
    # different completions differ half the time), so the advantages are not 0 at any step
    monkeypatch.setattr(TaskSource, "reward", lambda self, text, answer: float(zlib.crc32(text.encode()) % 2))
    run_dir = tmp_path / "run"
    assert main(["train", *tiny_overrides(run_dir, "log.wandb_mode=disabled", "grpo.num_iterations=2",
                                          "grpo.lr=0.01", "max_steps=4")]) == 0
    rows = _rows(run_dir)
    assert [r["iteration"] for r in rows] == [0, 1, 0, 1]
    assert all(r["reward_std"] > 0 for r in rows)
    for r in rows:
        if r["iteration"] == 0:  # old policy == current policy
            assert abs(r["importance_ratio/min"] - 1) < 1e-4 and abs(r["importance_ratio/max"] - 1) < 1e-4
            assert r["clip_ratio/region_mean"] == 0
        else:
            assert r["importance_ratio/max"] - r["importance_ratio/min"] > 0.1
            assert r["clip_ratio/region_mean"] > 0
            assert r["clip_ratio/region_mean"] == pytest.approx(r["clip_ratio/low_mean"] + r["clip_ratio/high_mean"])
