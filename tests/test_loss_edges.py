"""The loss functions at their edges, against the formulas their docstrings state: advantages at
G = 2 and under batch scaling, integer and float64 rewards, the log-ratio clamp at [-20, 20], the
defaults TRL uses (CISPO's cap, SAPO's temperatures, the sampler correction's mode and cap), the
boundaries of every comparison (a ratio exactly at the cap, an advantage of exactly 0), and the
alignment schedule's step count."""

from __future__ import annotations

import math

import pytest
import torch

from oisd_lab import losses

CLAMP = 20.0  # the documented bound on a log-ratio


# ------------------------------------------------------------------------------ advantages
def _plain_advantages(rewards: list[float], G: int, scale: str, eps: float = 1e-4) -> list[float]:
    out = []
    groups = [rewards[i:i + G] for i in range(0, len(rewards), G)]
    mean_all = sum(rewards) / len(rewards)
    std_all = math.sqrt(sum((r - mean_all) ** 2 for r in rewards) / (len(rewards) - 1))
    for group in groups:
        mean = sum(group) / G
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / (G - 1)) if G > 1 else 0.0
        for r in group:
            if all(x == group[0] for x in group):
                out.append(0.0)
            elif scale == "group":
                out.append((r - mean) / (std + eps))
            elif scale == "batch":
                out.append((r - mean) / (std_all + eps))
            else:
                out.append(r - mean)
    return out


@pytest.mark.parametrize("G", [2, 4])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_are_the_formula_at_every_group_size(G, scale):
    rewards = [1.0, 0.0, 0.5, 0.25, 0.0, 0.0, 2.0, 1.0]
    got = losses.group_advantages(torch.tensor(rewards, dtype=torch.float64), G, scale)
    torch.testing.assert_close(got, torch.tensor(_plain_advantages(rewards, G, scale), dtype=torch.float64),
                               rtol=1e-9, atol=1e-12)


def test_integer_rewards_give_the_float_advantages_and_float64_stays_float64():
    ints = torch.tensor([1, 0, 0, 1, 1, 1, 0, 1])
    as_float = losses.group_advantages(ints.float(), 4)
    torch.testing.assert_close(losses.group_advantages(ints, 4), as_float)
    assert losses.group_advantages(ints.double(), 4).dtype == torch.float64


# ------------------------------------------------------------------------------ clamps
def test_the_ppo_ratio_is_clamped_at_exp_minus_and_plus_20():
    logps = torch.tensor([[-30.0, 30.0, 0.5]], requires_grad=True)
    old = torch.zeros(1, 3)
    loss, _ = losses.clipped_surrogate(logps, old, torch.tensor([-1.0]), 1.0, 1e9)
    # A < 0: -min(rho A, clip(rho) A) = rho |A| with the unclipped-from-above rho
    torch.testing.assert_close(loss.detach(), torch.tensor([[math.exp(-CLAMP), math.exp(CLAMP), math.exp(0.5)]]),
                               rtol=1e-6, atol=0)


def test_the_k3_kl_clamps_its_log_ratio_at_20_both_ways():
    logps = torch.tensor([[0.0, 0.0, 0.0]])
    ref = torch.tensor([[-30.0, 30.0, 0.3]])
    delta = torch.tensor([-CLAMP, CLAMP, 0.3], dtype=torch.float64)
    expected = (torch.exp(delta) - delta - 1).float()[None]
    torch.testing.assert_close(losses.kl_k3(logps, ref), expected, rtol=1e-6, atol=0)


def test_the_sampler_weights_clamp_the_log_ratio_at_20_both_ways():
    old = torch.tensor([[-30.0], [30.0], [0.4]])
    sampler = torch.zeros(3, 1)
    mask = torch.ones(3, 1)
    w = losses.sampler_importance_weights(old, sampler, mask, "token_truncate", None, None)
    torch.testing.assert_close(w, torch.tensor([[math.exp(-CLAMP)], [math.exp(CLAMP)], [math.exp(0.4)]]),
                               rtol=1e-6, atol=0)


# ------------------------------------------------------------------------------ the sampler correction
def test_the_sampler_correction_defaults_are_trls():
    """TRL: vllm_importance_sampling_mode='sequence_mask', cap 3.0, no lower bound."""
    old = torch.tensor([[0.5, 0.6, 0.0], [0.1, 0.1, 0.1], [-0.5, -0.6, 0.0]])
    sampler = torch.zeros(3, 3)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    w = losses.sampler_importance_weights(old, sampler, mask)
    seq = [math.exp(1.1), math.exp(0.3), math.exp(-1.1)]  # sum over the masked tokens
    expected = torch.tensor([[0.0 if s > 3.0 else s] for s in seq])
    torch.testing.assert_close(w, expected, rtol=1e-6, atol=0)
    assert w.shape == (3, 1)


@pytest.mark.parametrize("mode", ["token_mask", "sequence_mask"])
def test_a_weight_exactly_at_a_bound_is_kept_by_the_mask(mode):
    """Outside [clip_min, clip_max] is masked; the bounds themselves are inside."""
    old = torch.tensor([[math.log(0.5)], [math.log(2.0)], [math.log(2.5)], [math.log(0.25)]], dtype=torch.float64)
    w = losses.sampler_importance_weights(old, torch.zeros_like(old), torch.ones_like(old), mode, 0.5, 2.0)
    torch.testing.assert_close(w, torch.tensor([[0.5], [2.0], [0.0], [0.0]], dtype=torch.float64))


def test_truncation_with_one_bound_clamps_on_that_side_only():
    old = torch.tensor([[math.log(0.1)], [math.log(5.0)]])
    ones = torch.ones(2, 1)
    low_only = losses.sampler_importance_weights(old, torch.zeros(2, 1), ones, "token_truncate", 0.5, None)
    torch.testing.assert_close(low_only, torch.tensor([[0.5], [5.0]]))
    high_only = losses.sampler_importance_weights(old, torch.zeros(2, 1), ones, "token_truncate", None, 3.0)
    torch.testing.assert_close(high_only, torch.tensor([[0.1], [3.0]]))


def test_the_sequence_weight_sums_over_tokens_of_each_row():
    old = torch.tensor([[0.1, 0.2, 0.3], [0.0, -0.2, 0.0]])
    mask = torch.ones(2, 3)
    w = losses.sampler_importance_weights(old, torch.zeros(2, 3), mask, "sequence_truncate", None, None)
    torch.testing.assert_close(w, torch.tensor([[math.exp(0.6)], [math.exp(-0.2)]]))


# ------------------------------------------------------------------------------ CISPO and SAPO
def test_cispo_caps_the_ratio_at_trls_default_of_5_and_counts_only_ratios_above_it():
    logps = torch.zeros(1, 4, requires_grad=True)
    ratio = torch.tensor([[5.0, 5.5, 4.0, 6.0]])
    adv = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    loss, info = losses.cispo_surrogate(logps, ratio, adv)
    loss.sum().backward()
    # d loss / d logp = -min(rho, 5) A
    torch.testing.assert_close(logps.grad, torch.tensor([[-5.0, -5.0, -4.0, 0.0]]))
    assert info["is_high_clipped"].tolist() == [[False, True, False, False]]  # at the cap, and A = 0: not clipped


def test_cispo_counts_a_clip_only_for_positive_advantages_of_any_size():
    logps = torch.zeros(1, 3)
    ratio = torch.full((1, 3), 9.0)
    _, info = losses.cispo_surrogate(logps, ratio, torch.tensor([[0.5, -0.5, 2.0]]), epsilon_high=5.0)
    assert info["is_high_clipped"].tolist() == [[True, False, True]]


def test_sapo_default_temperatures_are_1_and_1_05():
    ratio = torch.tensor([[1.3, 1.3]])
    adv = torch.tensor([[1.0, -1.0]])
    default, _ = losses.sapo_surrogate(ratio, adv)
    explicit, _ = losses.sapo_surrogate(ratio, adv, 1.0, 1.05)
    torch.testing.assert_close(default, explicit, rtol=0, atol=0)
    for pos, neg in ((2.0, 1.05), (1.0, 2.05)):
        other, _ = losses.sapo_surrogate(ratio, adv, pos, neg)
        assert not torch.allclose(other, default)


# ------------------------------------------------------------------------------ schedule
def test_alignment_schedules_need_at_least_one_step_and_one_is_enough():
    assert losses.alignment_scale(1, "stop", 1) == 1.0 and losses.alignment_scale(2, "stop", 1) == 0.0
    assert losses.alignment_scale(1, "linear", 1) == 1.0 and losses.alignment_scale(2, "linear", 1) == 0.0
    for schedule in ("stop", "linear"):
        with pytest.raises(ValueError, match="steps >= 1"):
            losses.alignment_scale(1, schedule)  # the default of 0 steps is refused
    assert losses.alignment_scale(7, "constant") == 1.0


# ------------------------------------------------------------------------------ temperatures
def _plain_logps(logits, tokens, T):
    return torch.log_softmax(logits.double() / T, -1).gather(-1, tokens[..., None])[..., 0]


@pytest.mark.parametrize("T", [0.7, 1.0, 2.0])
def test_token_logps_divide_by_any_temperature(T):
    torch.manual_seed(0)
    logits, tokens = torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
    torch.testing.assert_close(losses.token_logps(logits, tokens, T, chunk_size=3).double(),
                               _plain_logps(logits, tokens, T), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("T", [0.5, 2.0])
def test_kl_from_logits_divides_both_sides_by_the_temperature(T):
    torch.manual_seed(1)
    p, q = torch.randn(3, 7), torch.randn(3, 7)
    logp, logq = torch.log_softmax(p.double() / T, -1), torch.log_softmax(q.double() / T, -1)
    expected = (logp.exp() * (logp - logq)).sum(-1)
    torch.testing.assert_close(losses.kl_from_logits(p, q, T).double(), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_the_lens_jsd_at_a_degenerate_beta_is_zero_with_a_zero_gradient(beta):
    torch.manual_seed(2)
    h = torch.randn(4, 6, requires_grad=True)
    w = torch.randn(9, 6)
    out = losses.chunked_lens_jsd(h, torch.randn(4, 9), lambda x: x @ w.T, beta=beta, chunk_size=3)
    out.sum().backward()
    assert torch.equal(out.detach(), torch.zeros(4))
    assert h.grad is None or torch.equal(h.grad, torch.zeros(4, 6))  # nothing, or zeros, flows back


# ------------------------------------------------------------------------------ attention similarity
def _plain_cosine(teacher, student, keep):
    """Head-mean rows with the dropped keys zeroed, then the cosine, row by row."""
    t, s = teacher.double().mean(1), student.double().mean(1)  # [B, T, S]
    out = torch.zeros(t.shape[:2], dtype=torch.float64)
    for b in range(t.shape[0]):
        for i in range(t.shape[1]):
            a, c = t[b, i] * keep[b], s[b, i] * keep[b]
            out[b, i] = (a @ c) / (a.norm() * c.norm())
    return out


@pytest.mark.parametrize("exclude_sink", [False, True])
def test_attention_cosine_drops_masked_keys_and_the_sink(exclude_sink):
    torch.manual_seed(3)
    teacher = torch.softmax(torch.randn(2, 3, 4, 6), -1)  # mass on every key, padding included
    student = torch.softmax(torch.randn(2, 3, 4, 6), -1)
    key_mask = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])  # row 0 is left-padded by one
    keep = key_mask.bool().clone()
    if exclude_sink:
        keep[0, 1] = keep[1, 0] = False  # the first real key of each row
    got = losses.attention_cosine(teacher, student, torch.ones(2, 4), key_mask, exclude_sink)
    torch.testing.assert_close(got.double(), _plain_cosine(teacher, student, keep), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_the_jsd_at_a_degenerate_beta_keeps_every_leading_dimension(beta):
    q = torch.randn(2, 3, 5, requires_grad=True)
    out = losses.jsd(torch.randn(2, 3, 5), q, beta=beta)
    assert out.shape == (2, 3) and torch.equal(out.detach(), torch.zeros(2, 3))
    out.sum().backward()  # a zero that backward accepts


# ------------------------------------------------------------------------------ policy_loss dispatch
def _off_policy_case():
    torch.manual_seed(4)
    old = torch.randn(3, 4) - 2
    logps = (old + 0.8 * torch.randn(3, 4)).requires_grad_()
    return logps, old, torch.tensor([1.0, -1.0, 0.5]), torch.ones(3, 4)


def test_policy_loss_defaults_are_trls_clip_range_and_sapo_temperatures():
    logps, old, adv, mask = _off_policy_case()
    for loss_type, explicit in (("dapo", dict(epsilon_low=0.2, epsilon_high=0.2)),
                                ("sapo", dict(sapo_temperature_pos=1.0, sapo_temperature_neg=1.05))):
        default, _ = losses.policy_loss(logps, old, adv, mask, loss_type)
        given, _ = losses.policy_loss(logps, old, adv, mask, loss_type, **explicit)
        torch.testing.assert_close(default, given, rtol=0, atol=0)
        assert not torch.allclose(default, losses.policy_loss(logps, old, adv, mask, loss_type, "token", 0.9, 0.9,
                                                              2.0, 2.0)[0])


@pytest.mark.parametrize("loss_type", ["cispo", "sapo"])
def test_policy_loss_passes_its_settings_to_cispo_and_sapo(loss_type):
    logps, old, adv, mask = _off_policy_case()
    ratio = torch.exp(logps.detach() - old)
    got, _ = losses.policy_loss(logps, old, adv, mask, loss_type, "token", 0.2, 1.3, 1.7, 0.6)
    if loss_type == "cispo":  # -sg[min(rho, 1.3)] A log pi
        expected = -ratio.clamp(max=1.3) * adv[:, None] * logps.detach()
    else:  # -(4 / tau) sigmoid(tau (rho - 1)) A, tau = 1.7 where A > 0 else 0.6
        tau = torch.where(adv[:, None] > 0, 1.7, 0.6)
        expected = -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * adv[:, None]
    torch.testing.assert_close(got.detach(), expected, rtol=1e-5, atol=1e-7)


def test_the_importance_ratio_clamps_its_log_ratio_at_20_both_ways():
    logps = torch.tensor([[-30.0, 30.0, 0.2]])
    ratio = losses.importance_ratio(logps, torch.zeros(1, 3), torch.ones(1, 3), "token")
    torch.testing.assert_close(ratio, torch.tensor([[math.exp(-CLAMP), math.exp(CLAMP), math.exp(0.2)]]),
                               rtol=1e-6, atol=0)


@pytest.mark.parametrize("T", [0.5, 2.0])
def test_the_chunked_lens_jsd_at_a_temperature_is_the_plain_jsd(T):
    torch.manual_seed(5)
    h, w, teacher = torch.randn(5, 6), torch.randn(9, 6), torch.randn(5, 9)
    got = losses.chunked_lens_jsd(h, teacher, lambda x: x @ w.T, beta=0.5, temperature=T, chunk_size=2)
    torch.testing.assert_close(got, losses.jsd(teacher, h @ w.T, beta=0.5, temperature=T), rtol=1e-5, atol=1e-7)
    assert not torch.allclose(got, losses.jsd(teacher, h @ w.T, beta=0.5, temperature=1.0))


@pytest.mark.parametrize("beta", [-0.1, 1.5, 2.0])
def test_a_jsd_beta_outside_0_1_is_refused(beta):
    with pytest.raises(ValueError, match="beta must lie in"):
        losses.jsd(torch.zeros(2, 3), torch.zeros(2, 3), beta=beta)
