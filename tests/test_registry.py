"""The extension points (`oisd_lab.registry`): the advantage estimators against verl's definitions
(verl commit b178a3cd56f58b2d502255daba591e92833930a7, `verl/trainer/ppo/core_algos.py` and
`verl/utils/torch_functional.py::masked_whiten`) on hand-made tensors, the built-ins unchanged
behind the registry, and a toy policy loss, a toy estimator and a toy alignment channel added
through the registries alone that train with `oisd-lab train`."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_alignment_in_view, assert_gradients_flowed, tiny_overrides

from oisd_lab import losses
from oisd_lab.cli import main
from oisd_lab.config import ConfigError, compose
from oisd_lab.registry import ADVANTAGE_ESTIMATORS, ALIGNMENT_CHANNELS, POLICY_LOSSES

REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.5, 0.5, 0.5, 0.5])
LENGTHS = torch.tensor([3, 5, 2, 4, 1, 6, 3, 2, 4, 4, 1, 5])
G = 4


def _token_rewards(rewards, lengths):
    """verl's input: [B, T] token-level rewards, the outcome reward on each response's last token."""
    T = int(lengths.max())
    mask = (torch.arange(T)[None] < lengths[:, None]).float()
    token = torch.zeros(len(rewards), T)
    token[torch.arange(len(rewards)), lengths - 1] = rewards
    return token, mask


def _verl_whiten(values, mask):
    """masked_whiten: masked mean (denominator + 1e-8), Bessel-corrected masked variance, rsqrt(var + 1e-8)."""
    mean = (values * mask).sum() / (mask.sum() + 1e-8)
    var = (((values - mean) ** 2) * mask).sum() / (mask.sum() + 1e-8)
    var = var * mask.sum() / (mask.sum() - 1)
    return (values - mean) * torch.rsqrt(var + 1e-8)


def _per_sequence(advantages, mask):
    """verl returns [B, T], constant over a sequence's tokens for outcome rewards: one value per row."""
    first = advantages[:, 0]
    torch.testing.assert_close(advantages * mask, first[:, None] * mask)
    return first


def test_rloo_is_the_leave_one_out_baseline():
    token, mask = _token_rewards(REWARDS, LENGTHS)
    scores = token.sum(-1).view(-1, G)
    want = (scores * G / (G - 1) - scores.mean(1, keepdim=True) * G / (G - 1)).reshape(-1)
    got = losses.rloo_estimator(REWARDS, LENGTHS, G)
    torch.testing.assert_close(got, want)
    # by hand, group 1 (1, 0, 0, 1): r_i minus the mean of the other three
    torch.testing.assert_close(got[:4], torch.tensor([1 - 1 / 3, 0 - 2 / 3, 0 - 2 / 3, 1 - 1 / 3]))
    assert torch.equal(got[8:], torch.zeros(4))  # a constant group: 0
    torch.testing.assert_close(losses.rloo_estimator(REWARDS, LENGTHS, 1), REWARDS)  # groups of one keep r


def test_reinforce_plus_plus_whitens_returns_over_the_batch_tokens():
    token, mask = _token_rewards(REWARDS, LENGTHS)
    returns = torch.zeros_like(token)  # gamma = 1: reward-to-go, reset past each response's end
    running = torch.zeros(len(REWARDS))
    for t in reversed(range(token.shape[1])):
        running = token[:, t] + running
        returns[:, t] = running
        running = running * mask[:, t]
    want = _per_sequence(_verl_whiten(returns, mask) * mask, mask)
    got = losses.reinforce_plus_plus_estimator(REWARDS, LENGTHS, G)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # token-weighted: the mean over all tokens is 0
    assert abs(float((got * LENGTHS).sum())) < 1e-4


def test_reinforce_plus_plus_baseline_centres_by_group_then_whitens():
    token, mask = _token_rewards(REWARDS, LENGTHS)
    scores = token.sum(-1).view(-1, G)
    centred = (scores - scores.mean(1, keepdim=True)).reshape(-1)
    tiled = centred[:, None] * mask
    want = _per_sequence(_verl_whiten(tiled, mask) * mask, mask)
    got = losses.reinforce_plus_plus_baseline_estimator(REWARDS, LENGTHS, G)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_grpo_estimator_is_group_advantages():
    cfg = compose(["grpo.scale_rewards=batch", "grpo.std_ddof=0"])
    got = losses.advantages_of(REWARDS, LENGTHS, G, cfg.grpo)
    assert torch.equal(got, losses.group_advantages(REWARDS, G, "batch", cfg.grpo.adv_eps, 0))


def test_rewards_that_do_not_fill_whole_groups_are_refused():
    cfg = compose([])
    with pytest.raises(ValueError, match="not divisible by num_generations=4"):
        losses.advantages_of(torch.zeros(6), torch.ones(6), 4, cfg.grpo)
    with pytest.raises(ValueError, match="num_generations=0"):
        losses.advantages_of(torch.zeros(6), torch.ones(6), 0, cfg.grpo)


def test_registry_names_are_the_config_choices():
    assert set(POLICY_LOSSES.names()) == {"dapo", "grpo", "dr_grpo", "bnpo", "cispo", "sapo", "luspo", "vespo"}
    assert set(ADVANTAGE_ESTIMATORS.names()) >= {"grpo", "rloo", "reinforce_plus_plus", "reinforce_plus_plus_baseline"}
    with pytest.raises(ConfigError, match="grpo.advantage_estimator: unknown value 'ppo'"):
        compose(["grpo.advantage_estimator=ppo"])
    with pytest.raises(ValueError, match="already registered"):
        POLICY_LOSSES.register("dapo", losses.clipped_policy_loss)


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture()
def toy_entries():
    """A REINFORCE loss (-A log pi, token-mean over the batch) and a mean-baseline estimator,
    registered here and nowhere else."""
    seen = {"loss": 0, "estimator": 0}

    def reinforce(logps, ratio, advantages, options):
        seen["loss"] += 1
        adv = advantages[:, None] if advantages.dim() == 1 else advantages
        none = torch.zeros(logps.shape, dtype=torch.bool, device=logps.device)
        return -adv * logps, {"is_low_clipped": none, "is_high_clipped": none, "is_region_clipped": none}

    def mean_baseline(rewards, lengths, num_generations, options):
        seen["estimator"] += 1
        grouped = rewards.view(-1, num_generations)
        return (grouped - grouped.mean(1, keepdim=True)).reshape(-1)

    POLICY_LOSSES.register("toy_reinforce", reinforce, aggregation="dapo")
    ADVANTAGE_ESTIMATORS.register("toy_mean_baseline", mean_baseline)
    yield seen
    POLICY_LOSSES.unregister("toy_reinforce")
    ADVANTAGE_ESTIMATORS.unregister("toy_mean_baseline")


@pytest.mark.parametrize("options", [["grpo.loss_type=toy_reinforce"], ["grpo.advantage_estimator=toy_mean_baseline"],
                                     ["grpo.advantage_estimator=rloo", "method=oisd"],
                                     ["grpo.advantage_estimator=reinforce_plus_plus_baseline", "method=oisd"]])
def test_a_registered_entry_trains(options, toy_entries, tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    assert main(["train", *tiny_overrides(run_dir, "log.wandb_mode=disabled", "max_steps=2", *options)]) == 0
    rows = _rows(run_dir)
    assert [r["step"] for r in rows] == [1, 2]
    assert_gradients_flowed(rows)
    if "method=oisd" in options:
        assert_alignment_in_view(rows)
    if "toy" in options[0]:
        assert toy_entries["loss" if "loss_type" in options[0] else "estimator"] > 0


def test_the_built_in_channels_are_think_and_attn_in_that_order():
    assert ALIGNMENT_CHANNELS.names() == ("think", "attn")
    assert [ALIGNMENT_CHANNELS.meta(n, "weight") for n in ("think", "attn")] == ["logit_weight", "attn_weight"]
    with pytest.raises(ConfigError, match="method.channel_weights: unknown value 'toy'"):
        compose(["+method.channel_weights.toy=1"])


@pytest.fixture()
def toy_channel():
    """A hidden-state cosine channel (1 - cos(h_k, h_L) per token), registered here and nowhere
    else, with its weight in `method.channel_weights`."""
    seen = {"calls": 0, "layers": set()}

    def hidden_cosine(out, part, objective, shared):
        seen["calls"] += 1
        seen["layers"] |= set(out.hidden)
        mask = part.completion_mask
        return {k: (1 - torch.nn.functional.cosine_similarity(out.hidden[k], out.final.detach(), dim=-1)) * mask
                for k in objective.student_layers}

    ALIGNMENT_CHANNELS.register("toy_cosine", hidden_cosine, capture="hidden")
    yield seen
    ALIGNMENT_CHANNELS.unregister("toy_cosine")


def test_a_registered_channel_trains(toy_channel, tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(run_dir, "log.wandb_mode=disabled", "max_steps=2", "method.layers=[1]",
                               "+method.channel_weights.toy_cosine=0.5", "method.weighting=uniform")
    assert main(["train", *overrides]) == 0
    rows = _rows(run_dir)
    assert [r["step"] for r in rows] == [1, 2]
    assert_gradients_flowed(rows)
    assert toy_channel["calls"] > 0 and toy_channel["layers"] == {1}
    for row in rows:
        assert row["loss/toy_cosine"] > 0 and "loss/think" not in row and "loss/attn" not in row
        assert row["loss/total"] == pytest.approx(row["loss/policy"] + 0.5 * row["loss/toy_cosine"], rel=1e-5, abs=1e-7)
    assert rows[1]["grad/toy_cosine/norm"] > 0  # step 2 logs: the gradient view separates the channel
