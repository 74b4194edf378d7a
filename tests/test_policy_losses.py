"""The GRPO family's policy losses under TRL's names, against hand-computed values: the clipped
surrogate with a ratio != 1 (several updates per batch), GSPO's sequence ratio, CISPO, SAPO and the
sampler-mismatch weights; and where each reduces to the one-update GRPO loss."""

from __future__ import annotations

import math

import pytest
import torch

from oisd_lab.losses import (
    aggregate,
    aggregation_of,
    cispo_surrogate,
    clipped_surrogate,
    importance_ratio,
    policy_loss,
    ppo_clip,
    sampler_importance_weights,
    sapo_surrogate,
)

RHO = [0.5, 0.9, 1.1, 1.25, 1.5]


def _logps_at(ratios):
    """logps with gradient whose ratio to old = 0 is `ratios` ([B, T])."""
    return torch.tensor(ratios, dtype=torch.float64).log().requires_grad_()


def test_clip_engages_exactly_where_trl_clips():
    lp = _logps_at([RHO, RHO])
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    loss, info = clipped_surrogate(lp, torch.zeros_like(lp), adv, 0.2, 0.2)
    # A > 0: -min(rho, clip(rho, 0.8, 1.2)); A < 0: max(rho, clip(rho, 0.8, 1.2))
    expected = torch.tensor([[-0.5, -0.9, -1.1, -1.2, -1.2], [0.8, 0.9, 1.1, 1.25, 1.5]], dtype=torch.float64)
    torch.testing.assert_close(loss.detach(), expected)
    assert info["is_high_clipped"].tolist() == [[False, False, False, True, True], [False] * 5]
    assert info["is_low_clipped"].tolist() == [[False] * 5, [True, False, False, False, False]]
    assert info["is_region_clipped"].sum() == 3
    loss.sum().backward()
    # d/dlogp of rho * A is rho * A; a clipped token has no gradient
    expected_grad = torch.tensor([[-0.5, -0.9, -1.1, 0.0, 0.0], [0.0, 0.9, 1.1, 1.25, 1.5]], dtype=torch.float64)
    torch.testing.assert_close(lp.grad, expected_grad)


def test_clip_higher_moves_only_the_upper_bound():
    lp = _logps_at([RHO, RHO])
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    loss, info = ppo_clip(importance_ratio(lp, torch.zeros_like(lp), torch.ones(2, 5)), adv, 0.2, 0.28)
    torch.testing.assert_close(loss.detach()[0], torch.tensor([-0.5, -0.9, -1.1, -1.25, -1.28], dtype=torch.float64))
    torch.testing.assert_close(loss.detach()[1], torch.tensor([0.8, 0.9, 1.1, 1.25, 1.5], dtype=torch.float64))
    assert info["is_high_clipped"][0].tolist() == [False, False, False, False, True]


def test_sequence_ratio_is_the_geometric_mean_over_completion_tokens():
    logps = torch.tensor([[0.3, -0.1, 5.0]], dtype=torch.float64, requires_grad=True)
    old, mask = torch.zeros(1, 3, dtype=torch.float64), torch.tensor([[1.0, 1.0, 0.0]])
    ratio = importance_ratio(logps, old, mask, "sequence")
    assert ratio.shape == (1, 1)
    torch.testing.assert_close(ratio, torch.tensor([[math.exp(0.1)]], dtype=torch.float64))
    loss, info = policy_loss(logps, old, torch.tensor([1.0], dtype=torch.float64), mask,
                             importance_sampling_level="sequence")
    assert loss.shape == (1, 3) and not info["is_high_clipped"].any()
    aggregate(loss, mask, "grpo").backward()
    # d/dlogp_t of -exp(mean_t log ratio) = -rho / |o| on completion tokens, 0 on padding
    g = -math.exp(0.1) / 2
    torch.testing.assert_close(logps.grad, torch.tensor([[g, g, 0.0]], dtype=torch.float64))


def test_sequence_clip_acts_on_the_whole_sequence():
    logps = torch.tensor([[0.5, 0.5], [0.1, -0.1]], dtype=torch.float64, requires_grad=True)
    loss, info = policy_loss(logps, torch.zeros_like(logps), torch.tensor([1.0, 1.0]), torch.ones(2, 2),
                             importance_sampling_level="sequence", epsilon_low=3e-4, epsilon_high=4e-4)
    # rho = e^0.5 > 1.0004: every token of row 0 is clipped; row 1 has rho = 1 exactly
    assert info["is_high_clipped"].tolist() == [[True, True], [False, False]]
    torch.testing.assert_close(loss.detach(), torch.tensor([[-1.0004] * 2, [-1.0] * 2], dtype=torch.float64))


def test_cispo_caps_the_detached_ratio_at_epsilon_high():
    logps = torch.tensor([[-1.0, -2.0]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[-1.5, -1.0]], dtype=torch.float64)
    ratio = importance_ratio(logps, old, torch.ones(1, 2))  # e^0.5 = 1.6487, e^-1 = 0.3679
    loss, info = cispo_surrogate(logps, ratio, torch.tensor([2.0], dtype=torch.float64), epsilon_high=1.5)
    w = [1.5, math.exp(-1.0)]
    # loss = -min(rho, cap) * A * logp
    torch.testing.assert_close(loss.detach(), torch.tensor([[-w[0] * 2 * -1.0, -w[1] * 2 * -2.0]], dtype=torch.float64))
    assert info["is_high_clipped"].tolist() == [[True, False]] and not info["is_low_clipped"].any()
    loss.sum().backward()
    # the weight is a constant: the gradient is -w * A, and the capped token keeps its gradient
    torch.testing.assert_close(logps.grad, torch.tensor([[-3.0, -2 * w[1]]], dtype=torch.float64))


def test_sapo_soft_gate_values_and_slope():
    logps = torch.tensor([[math.log(1.5)], [math.log(0.5)]], dtype=torch.float64, requires_grad=True)
    ratio = importance_ratio(logps, torch.zeros_like(logps), torch.ones(2, 1))
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    loss, info = sapo_surrogate(ratio, adv, temperature_pos=1.0, temperature_neg=1.05)

    def sig(x):
        return 1 / (1 + math.exp(-x))

    # -(4 / tau) sigmoid(tau (rho - 1)) A
    expected = [[-4.0 * sig(0.5)], [4.0 / 1.05 * sig(1.05 * -0.5)]]
    torch.testing.assert_close(loss.detach(), torch.tensor(expected, dtype=torch.float64))
    assert not info["is_region_clipped"].any()
    loss.sum().backward()
    # d/dlogp = -4 sig (1 - sig) rho A
    s_pos, s_neg = sig(0.5), sig(-0.525)
    torch.testing.assert_close(logps.grad, torch.tensor(
        [[-4 * s_pos * (1 - s_pos) * 1.5], [4 * s_neg * (1 - s_neg) * 0.5]], dtype=torch.float64))


def _case(seed=0):
    g = torch.Generator().manual_seed(seed)
    logps = (-torch.rand(4, 6, generator=g, dtype=torch.float64) * 3).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0]],
                        dtype=torch.float64)
    adv = torch.tensor([1.2, -0.7, 0.4, -0.9], dtype=torch.float64)
    return logps, mask, adv


def _grad(loss_fn, logps):
    logps.grad = None
    loss_fn().backward()
    return logps.grad.clone()


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
def test_policy_loss_on_policy_is_todays_grpo(loss_type):
    logps, mask, adv = _case()
    today, _ = clipped_surrogate(logps, None, adv)
    new, info = policy_loss(logps, None, adv, mask, loss_type)
    torch.testing.assert_close(new, today)
    assert torch.equal(info["ratio"], torch.ones_like(logps))
    g_today = _grad(lambda: aggregate(clipped_surrogate(logps, None, adv)[0], mask, loss_type), logps)
    g_new = _grad(lambda: aggregate(policy_loss(logps, None, adv, mask, loss_type)[0], mask, loss_type), logps)
    torch.testing.assert_close(g_new, g_today)


@pytest.mark.parametrize("variant", [dict(importance_sampling_level="sequence"), dict(loss_type="cispo", epsilon_high=5.0),
                                     dict(loss_type="sapo")])
@pytest.mark.parametrize("agg", ["dapo", "grpo"])
def test_every_variant_has_grpos_gradient_on_policy(variant, agg):
    """With one update per batch (ratio 1), GSPO, CISPO and SAPO give GRPO's gradient."""
    logps, mask, adv = _case(1)
    g_grpo = _grad(lambda: aggregate(policy_loss(logps, None, adv, mask, "dapo")[0], mask, agg), logps)
    kwargs = {"loss_type": "dapo", **variant}
    g_var = _grad(lambda: aggregate(policy_loss(logps, None, adv, mask, **kwargs)[0], mask, agg), logps)
    torch.testing.assert_close(g_var, g_grpo)


def test_aggregation_follows_trl():
    assert [aggregation_of(t) for t in ("cispo", "sapo", "dapo", "grpo", "bnpo", "dr_grpo")] == [
        "dapo", "grpo", "dapo", "grpo", "bnpo", "dr_grpo"]


def test_padding_poison_does_not_reach_the_sequence_ratio():
    logps, mask, adv = _case(2)
    old = logps.detach() - 0.05
    clean, _ = policy_loss(logps, old, adv, mask, importance_sampling_level="sequence")
    poisoned = torch.where(mask.bool(), logps, 1e4)
    dirty, _ = policy_loss(poisoned, old, adv, mask, importance_sampling_level="sequence")
    torch.testing.assert_close(aggregate(dirty, mask, "grpo"), aggregate(clean, mask, "grpo"))


@pytest.mark.parametrize(("mode", "clip_min", "expected"), [
    ("token_truncate", None, [[3.0, math.exp(-0.5), 1.0]]),
    ("token_truncate", 0.7, [[3.0, 0.7, 1.0]]),
    ("token_mask", None, [[0.0, math.exp(-0.5), 1.0]]),
    ("token_mask", 0.7, [[0.0, 0.0, 1.0]]),
    ("sequence_truncate", None, [[math.e]]),
    ("sequence_mask", None, [[math.e]]),
    ("sequence_mask", 3.0, [[0.0]]),
])
def test_sampler_weights_by_mode(mode, clip_min, expected):
    old = torch.zeros(1, 4, dtype=torch.float64)
    sampler = torch.tensor([[-1.5, 0.5, 0.0, -9.0]], dtype=torch.float64)  # last slot is padding
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = sampler_importance_weights(old, sampler, mask, mode, clip_min=clip_min, clip_max=3.0)
    # d = old - sampler = [1.5, -0.5, 0]: token ratios [4.48, 0.61, 1]; sequence ratio e^(1.0)
    got = w[:, :3] if w.shape[1] == 4 else w
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))
    if w.shape[1] == 4:
        assert w[0, 3] == 1.0  # padding: ratio 1 (its loss is masked anyway)


def test_unknown_names_are_rejected():
    logps, mask, adv = _case()
    with pytest.raises(ValueError, match="loss_type"):
        policy_loss(logps, None, adv, mask, "ppo")
    with pytest.raises(ValueError, match="importance_sampling_level"):
        importance_ratio(logps, logps, mask, "group")
    with pytest.raises(ValueError, match="vllm_importance_sampling_mode"):
        sampler_importance_weights(logps, logps, mask, "token")
