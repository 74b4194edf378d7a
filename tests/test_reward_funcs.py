"""Several reward functions (`grpo.reward_funcs`, `reward_weights`, TRL's
`multi_objective_aggregation`): the format reward and DAPO's overlong penalty by hand, GDPO's
normalize_then_sum against TRL's definition (trl/trainer/grpo_trainer.py
`_generate_and_score_completions`, TRL 0.26), each function logged, and a training run."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import assert_alignment_in_view, assert_gradients_flowed, tiny_overrides

from oisd_lab import losses
from oisd_lab.cli import main
from oisd_lab.config import ConfigError, compose
from oisd_lab.rewards import format_reward, overlong_penalty


def test_format_reward():
    assert format_reward("so the answer is \\boxed{12}", "12", 9, None) == 1.0
    assert format_reward("I do not know", "12", 4, None) == 0.0


def test_overlong_penalty_is_dapos_soft_punishment():
    opts = SimpleNamespace(max_completion_length=100, overlong_buffer=20)
    # 0 up to L_max - L_cache = 80 tokens, then (80 - len) / 20 down to -1 at 100, -1 beyond
    assert [overlong_penalty("", "", n, opts) for n in (10, 80, 81, 90, 100, 101)] == \
        [0.0, 0.0, -0.05, -0.5, -1.0, -1.0]
    assert overlong_penalty("", "", 100, SimpleNamespace(max_completion_length=100, overlong_buffer=0)) == 0.0


def _trl_normalize_then_sum(per_func, weights, G):
    grouped = per_func.view(-1, G, per_func.shape[1])
    mean_k = torch.nanmean(grouped, dim=1, keepdim=True)
    std_k = grouped.std(dim=1, keepdim=True)  # TRL's nanstd: Bessel-corrected
    reward_k = ((grouped - mean_k) / (std_k + 1e-4)).view(-1, per_func.shape[1])
    rewards = (reward_k * weights[None]).nansum(dim=1)
    return (rewards - rewards.mean()) / (rewards.std() + 1e-4)


def test_normalize_then_sum_matches_trl():
    g = torch.Generator().manual_seed(0)
    per_func = torch.cat([(torch.rand(12, 1, generator=g) > 0.5).float(), torch.rand(12, 1, generator=g),
                          -torch.rand(12, 1, generator=g)], dim=1)
    weights = torch.tensor([1.0, 0.5, 2.0])
    got = losses.normalize_then_sum_advantages(per_func, weights, 4)
    torch.testing.assert_close(got, _trl_normalize_then_sum(per_func, weights, 4))
    assert abs(float(got.mean())) < 1e-6
    # groups of one completion: each reward is its group's mean, so every advantage is 0
    assert losses.normalize_then_sum_advantages(per_func, weights, 1).tolist() == [0.0] * 12


def test_bad_reward_settings_are_one_line_errors():
    with pytest.raises(ConfigError, match="grpo.reward_funcs"):
        compose(["grpo.reward_funcs=[correct,brevity]"])
    with pytest.raises(ConfigError, match="grpo.reward_weights"):
        compose(["grpo.reward_funcs=[correct,format]", "grpo.reward_weights=[1.0]"])
    with pytest.raises(ConfigError, match="grpo.multi_objective_aggregation"):
        compose(["grpo.multi_objective_aggregation=mean"])


@pytest.mark.slow
@pytest.mark.parametrize("aggregation", ["sum_then_normalize", "normalize_then_sum"])
def test_train_with_three_reward_functions(aggregation, tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    assert main(["train", *tiny_overrides(run_dir, "log.wandb_mode=disabled", "max_steps=2", "method=oisd",
                                          "grpo.reward_funcs=[correct,format,overlong]",
                                          "grpo.reward_weights=[1.0,0.5,1.0]", "grpo.overlong_buffer=8",
                                          f"grpo.multi_objective_aggregation={aggregation}")]) == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert_gradients_flowed(rows)
    assert_alignment_in_view(rows)
    for r in rows:
        for name in ("correct", "format", "overlong"):
            assert f"rewards/{name}/mean" in r and f"rewards/{name}/std" in r
        assert -1.0 <= r["rewards/overlong/mean"] <= 0.0 and 0.0 <= r["rewards/format/mean"] <= 1.0
        want = r["rewards/correct/mean"] + 0.5 * r["rewards/format/mean"] + r["rewards/overlong/mean"]
        assert r["reward"] == pytest.approx(want, abs=1e-5)
