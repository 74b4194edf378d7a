"""End-to-end runs on the embedded default: the exact files a run writes, that training changes
the parameters, that every preset logs its own loss terms and the per-layer metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import assert_gradients_flowed, tiny_overrides
from safetensors.torch import load_file

from oisd_lab.cli import main
from oisd_lab.config import compose
from oisd_lab.pretrain import warm_start
from oisd_lab.sources import TaskSource
from oisd_lab.train import train

pytestmark = pytest.mark.slow


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def oisd_run(tmp_path_factory, cache_dir):
    run_dir = tmp_path_factory.mktemp("runs") / "oisd"
    # uniform weighting: the alignment terms move every parameter, also in groups whose rewards
    # are all equal (zero advantages would, correctly, give them no signed alignment gradient)
    cfg = compose(tiny_overrides(run_dir, "method=oisd", "method.weighting=uniform"))
    return cfg, train(cfg)


def test_run_directory_holds_everything(oisd_run):
    cfg, run = oisd_run
    names = {p.name for p in run.iterdir()}
    assert {"config.yaml", "env.json", "status.json", "metrics.jsonl", "completions.jsonl", "eval.json",
            "diagnostics.jsonl", "checkpoints", "final_model", "snapshots", "wandb"} <= names
    assert json.loads((run / "status.json").read_text())["status"] == "finished"
    env = json.loads((run / "env.json").read_text())
    assert env["torch"] == torch.__version__ and "commit" in env
    assert sorted(p.name for p in (run / "checkpoints").glob("*.ckpt")) == ["last.ckpt", "step=2.ckpt"]
    assert len(list((run / "wandb").glob("offline-run-*"))) == 1
    result = json.loads((run / "eval.json").read_text())
    for when in ("before", "after"):
        assert result[when]["n"] == 16 and result[when]["k"] == 2
        assert 0.0 <= result[when]["greedy_acc"] <= 1.0 and 0.0 <= result[when]["avg_at_k"] <= 1.0


def test_metrics_table_has_every_step_once_with_separate_losses(oisd_run):
    cfg, run = oisd_run
    rows = _rows(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        for key in ("reward", "loss/policy", "loss/think", "loss/attn", "grad_norm", "entropy",
                    "clip_ratio/region_mean", "completions/mean_length", "frac_reward_zero_std"):
            assert key in r, key
        assert r["loss/think"] >= -0.7 and abs(r["loss/attn"]) < 0.7  # |signed JSD| <= ln 2
    # per-layer metrics on logging steps (1, every_n_steps=2, and the last)
    diag_steps = [r["step"] for r in rows if "diag/lens_acc/all/L06" in r]
    assert diag_steps == [1, 2, 3]
    last = rows[-1]
    assert last["diag/agree_top1/all/L06"] == 1.0 and abs(last["diag/kl/all/L06"]) < 1e-5


def test_per_layer_diagnostics_cover_all_layers_and_splits(oisd_run):
    cfg, run = oisd_run
    rows = [r for r in _rows(run / "diagnostics.jsonl") if r["step"] == 3]
    assert {r["layer"] for r in rows} == set(range(7))
    assert {r["split"] for r in rows} == {"all", "pos", "neg", "correct", "wrong"}
    final = next(r for r in rows if r["layer"] == 6 and r["split"] == "all")
    assert final["agree_top1"] == 1.0 and final["attn_jsd"] < 1e-6 and final["attn_cos"] > 0.9999
    assert len(final["attn_jsd_head"]) == 4
    snap = json.loads(sorted((run / "snapshots").glob("*.json"))[-1].read_text())
    r0 = snap["rollouts"][0]
    assert len(r0["top_token"]) == 7 and len(r0["top_token"][0]) == len(r0["tokens"])
    assert set(r0["attention"]) == {"L1", "L6"}


def test_training_changes_the_parameters(oisd_run, cache_dir):
    cfg, run = oisd_run
    rows = _rows(run / "metrics.jsonl")
    assert_gradients_flowed(rows)
    start = load_file(str(warm_start(cfg) / "model.safetensors"))
    end = load_file(str(run / "final_model" / "model.safetensors"))
    assert start.keys() == end.keys()
    # rewards vary within groups: the policy gradient reaches every weight
    assert {k for k in start if not torch.equal(start[k], end[k])} == set(start)


def test_the_alignment_alone_moves_only_what_the_lens_reaches(tmp_path, cache_dir, monkeypatch):
    # equal rewards everywhere: no policy gradient, so only the (uniformly weighted) alignment terms
    # move weights: the student (layer 1, i.e. decoder layer 0), the tied embedding/unembedding and
    # the final norm that the lens reuses. The layers above the student only shape the detached
    # teacher and must stay exactly as they were.
    monkeypatch.setattr(TaskSource, "reward", lambda self, text, answer: 0.0)
    cfg = compose(tiny_overrides(tmp_path / "run", "method=oisd", "method.weighting=uniform",
                                 "log.wandb_mode=disabled"))
    run = train(cfg)
    assert all(r["frac_reward_zero_std"] == 1.0 for r in _rows(run / "metrics.jsonl"))
    start = load_file(str(warm_start(cfg) / "model.safetensors"))
    end = load_file(str(run / "final_model" / "model.safetensors"))
    changed = {k for k in start if not torch.equal(start[k], end[k])}
    expected = {k for k in start if k.startswith("model.layers.0.")} | {"model.embed_tokens.weight", "model.norm.weight"}
    assert changed == expected


@pytest.mark.parametrize("method", ["grpo", "oisd_logit", "oisd_attn", "oisd_unsigned"])
def test_each_preset_runs_and_logs_its_losses(tmp_path, cache_dir, method):
    run = train(compose(tiny_overrides(tmp_path / method, f"method={method}", "max_steps=2",
                                       "log.wandb_mode=disabled")))
    rows = _rows(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert ("loss/think" in rows[0]) == (method in ("oisd_logit", "oisd_unsigned"))
    assert ("loss/attn" in rows[0]) == (method in ("oisd_attn", "oisd_unsigned"))
    assert "diag/lens_acc/all/L01" in rows[0]


def test_cli_main_job_prints_summary_and_ends_with_the_run_dir(tmp_path, cache_dir, capsys):
    run_dir = tmp_path / "cli"
    assert main(["train", *tiny_overrides(run_dir, "max_steps=1", "log.wandb_mode=disabled")]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == str(run_dir)
    assert any("greedy accuracy" in line for line in out)


def test_a_bad_setting_stops_before_anything_is_written(tmp_path, capsys):
    run_dir = tmp_path / "bad"
    assert main(["train", f"run_dir={run_dir}", "grpo.num_generations=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: grpo.num_generations:") and "\n" not in err
    assert not run_dir.exists()
