"""LUSPO and VESPO as TRL defines them (huggingface/trl f2cd577, `GRPOTrainer._compute_loss` and
`get_gamma_weights`), against formulas written out with `math` on hand-made tensors; the sampler
weights folded into VESPO's sequence weight, not multiplied in again by the step; TRL's warnings."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from conftest import assert_alignment_in_view, assert_gradients_flowed, tiny_overrides

from oisd_lab import losses
from oisd_lab.cli import main
from oisd_lab.config import ConfigError, compose
from oisd_lab.errors import ConfigWarning
from oisd_lab.registry import POLICY_LOSSES

TRL_COMMIT = "f2cd57710ae345ea6428ae95363267fcf38a3dc8"


def _phi(log_w: float, adv: float, k_pos=2.0, lam_pos=3.0, k_neg=3.0, lam_neg=2.0) -> float:
    """phi(w) = e^lambda w^k e^(-lambda w) with TRL's clamp of log w to [log 1e-8, 20]."""
    log_w = min(max(log_w, math.log(1e-8)), 20.0)
    k, lam = (k_pos, lam_pos) if adv >= 0 else (k_neg, lam_neg)
    w = math.exp(log_w)
    return math.exp(lam) * w**k * math.exp(-lam * w)


LOGP = [[-0.5, -1.2, -0.3, 7.0], [-2.0, -0.1, -0.7, -0.4], [-0.9, -0.6, 3.0, 3.0]]
OLD = [[-0.4, -1.0, -0.5, 0.0], [-2.2, -0.3, -0.6, -0.2], [-0.8, -0.7, 0.0, 0.0]]
MASK = [[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]]
ADV = [1.5, -0.5, 0.0]


def _batch():
    logps = torch.tensor(LOGP, dtype=torch.float64, requires_grad=True)
    return logps, torch.tensor(OLD, dtype=torch.float64), torch.tensor(MASK, dtype=torch.float64), \
        torch.tensor(ADV, dtype=torch.float64)


def test_gamma_weight_is_trls_formula_of_the_summed_sequence_log_ratio():
    logps, old, mask, adv = _batch()
    phi = losses.vespo_gamma_weights(adv, logps.detach() - old, mask)
    want = []
    for i in range(3):  # the SUM of the masked token log-ratios (not GSPO's mean)
        log_w = sum((LOGP[i][t] - OLD[i][t]) * MASK[i][t] for t in range(4))
        want.append([_phi(log_w, ADV[i])])
    torch.testing.assert_close(phi, torch.tensor(want, dtype=torch.float64))
    assert not phi.requires_grad
    # phi(1) = 1 for both signs, and the asymmetric pairs give different shapes away from 1
    ones = losses.vespo_gamma_weights(torch.tensor([1.0, -1.0]), torch.zeros(2, 3), torch.ones(2, 3))
    torch.testing.assert_close(ones, torch.ones(2, 1))
    assert _phi(0.3, 1.0) != pytest.approx(_phi(0.3, -1.0))


def test_gamma_weight_clamps_extreme_ratios_and_never_returns_nan():
    adv = torch.tensor([1.0, -1.0, 1.0])
    log_ratio = torch.tensor([[30.0, 30.0], [-40.0, -40.0], [float("nan"), 0.0]])
    phi = losses.vespo_gamma_weights(adv, log_ratio, torch.ones(3, 2))
    # log w = 40 -> clamped to 20: e^3 e^40 e^(-3 e^20) underflows to 0; log w = -80 -> log 1e-8
    assert phi[0].item() == 0.0
    assert phi[1].item() == pytest.approx(_phi(math.log(1e-8), -1.0), rel=1e-5)
    assert torch.isfinite(phi).all()


def test_sampler_token_weights_enter_the_sequence_weight():
    logps, old, mask, adv = _batch()
    is_w = torch.tensor([[0.9, 1.1, 0.8, 5.0], [1.0, 1.2, 0.7, 0.95], [1.3, 0.6, 9.0, 9.0]], dtype=torch.float64)
    phi = losses.vespo_gamma_weights(adv, logps.detach() - old, mask, is_w)
    want = []
    for i in range(3):
        log_w = sum((LOGP[i][t] - OLD[i][t] + math.log(is_w[i][t].item())) * MASK[i][t] for t in range(4))
        want.append([_phi(log_w, ADV[i])])
    torch.testing.assert_close(phi, torch.tensor(want, dtype=torch.float64))


def test_vespo_loss_and_gradient_are_minus_phi_a_logp_over_the_batch_tokens():
    logps, old, mask, adv = _batch()
    per_tok, info = losses.policy_loss(logps, old, adv, mask, "vespo", options=compose([]).grpo)
    assert losses.aggregation_of("vespo") == "dapo" and not any(info[k].any() for k in info if k.startswith("is_"))
    loss = losses.aggregate(per_tok, mask, "dapo")
    loss.backward()
    n = sum(map(sum, MASK))
    want_value, want_grad = 0.0, torch.zeros(3, 4, dtype=torch.float64)
    for i in range(3):
        log_w = sum((LOGP[i][t] - OLD[i][t]) * MASK[i][t] for t in range(4))
        phi = _phi(log_w, ADV[i])
        for t in range(4):
            if MASK[i][t]:
                want_value += -phi * ADV[i] * LOGP[i][t] / n
                want_grad[i, t] = -phi * ADV[i] / n  # phi is detached: no gradient through w
    assert loss.item() == pytest.approx(want_value, rel=1e-12)
    torch.testing.assert_close(logps.grad, want_grad)


def test_vespo_options_are_read_from_the_config():
    logps, old, mask, adv = _batch()
    g = compose(["grpo.loss_type=vespo", "grpo.vespo_k_pos=1.0", "grpo.vespo_lambda_pos=0.5"]).grpo
    per_tok, _ = losses.policy_loss(logps, old, adv, mask, "vespo", options=g)
    log_w = sum((LOGP[0][t] - OLD[0][t]) * MASK[0][t] for t in range(4))
    assert per_tok[0, 0].item() == pytest.approx(-_phi(log_w, 1.5, k_pos=1.0, lam_pos=0.5) * 1.5 * LOGP[0][0])


def test_luspo_is_each_completions_loss_times_its_length_at_sequence_level():
    logps, old, mask, adv = _batch()
    per_tok, _ = losses.policy_loss(logps, old, adv, mask, "luspo", "sequence", epsilon_low=0.2, epsilon_high=0.2)
    assert losses.aggregation_of("luspo") == "luspo"
    loss = losses.aggregate(per_tok, mask, "luspo")
    # TRL: per-sequence loss l_i [B, 1]; (l_i * |y_i|).mean() over rows
    want = 0.0
    for i in range(3):
        n_i = sum(MASK[i])
        rho = math.exp(sum((LOGP[i][t] - OLD[i][t]) * MASK[i][t] for t in range(4)) / n_i)
        a = ADV[i]
        l_i = -min(rho * a, min(max(rho, 0.8), 1.2) * a)
        want += l_i * n_i / 3
    assert loss.item() == pytest.approx(want, rel=1e-12)


def test_luspo_micro_batches_sum_to_the_whole_batch_in_value_and_gradient():
    torch.manual_seed(0)
    logps = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    old = logps.detach() + 0.1 * torch.randn(6, 5, dtype=torch.float64)
    mask = (torch.rand(6, 5) > 0.3).double()
    adv = torch.randn(6, dtype=torch.float64)
    per_tok, _ = losses.policy_loss(logps, old, adv, mask, "luspo", "sequence")
    whole = losses.aggregate(per_tok, mask, "luspo")
    (g_whole,) = torch.autograd.grad(whole, logps, retain_graph=True)
    parts = sum(losses.aggregate(per_tok[s], mask[s], "luspo", num_sequences=6) for s in (slice(0, 2), slice(2, 6)))
    (g_parts,) = torch.autograd.grad(parts, logps)
    torch.testing.assert_close(parts, whole)
    torch.testing.assert_close(g_parts, g_whole)


def test_the_step_does_not_multiply_vespos_sampler_weights_in_twice(tiny_model, char_tokenizer):
    from test_alignment_options import _module, _rollout

    from oisd_lab import step as step_lib

    rollout = _rollout([6, 3, 8, 5, 2, 7, 8, 4], [0, 1, 2, 0] * 2)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 1.0, -1.0, 0.5, -0.5])
    module = _module(tiny_model, char_tokenizer, "method=grpo", "grpo.prompts_per_step=2", "grpo.loss_type=vespo")
    old = step_lib.old_policy_logps(tiny_model, rollout, module.objective, 8)
    mask = rollout.completion_mask
    is_w = (1.0 + 0.2 * torch.rand(mask.shape, generator=torch.Generator().manual_seed(1))) * mask + (1 - mask)
    part = type(rollout)(**{**rollout.__dict__, "old_logps": old - 0.05 * mask, "is_weights": is_w})
    norm = module.normalisers(part)
    got = step_lib.loss_terms(module.objective.forward(tiny_model, part), part.scored(adv), norm, module.objective)
    current = step_lib.old_policy_logps(tiny_model, part, module.objective, 8)
    phi = losses.vespo_gamma_weights(adv, current - part.old_logps, mask, is_w)
    want = losses.aggregate(-phi * adv[:, None] * current, mask, "dapo", **norm)
    torch.testing.assert_close(got["loss/policy"].detach(), want, rtol=1e-5, atol=1e-7)


def test_trls_warnings_and_the_vespo_config_errors():
    for overrides, fragment in [(["grpo.loss_type=luspo"], "luspo: set grpo.importance_sampling_level=sequence"),
                                (["grpo.loss_type=vespo", "grpo.importance_sampling_level=sequence"], "vespo"),
                                (["grpo.importance_sampling_level=sequence"], "loss_type=dapo sums token")]:
        with pytest.warns(ConfigWarning, match=fragment):
            compose(overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)
        compose(["grpo.loss_type=luspo", "grpo.importance_sampling_level=sequence"])
        compose(["grpo.loss_type=grpo", "grpo.importance_sampling_level=sequence"])
        compose(["grpo.loss_type=vespo"])
    with pytest.raises(ConfigError, match=r"^grpo.vespo_lambda_pos/neg: use values > 0"):
        compose(["grpo.loss_type=vespo", "grpo.vespo_lambda_neg=0"])
    with pytest.raises(ConfigError, match=r"^grpo.vllm_importance_sampling_mode: is sequence_mask; loss_type=vespo"):
        compose(["grpo.loss_type=vespo", "grpo.rollout_backend=vllm"])
    assert POLICY_LOSSES.meta("vespo", "own_is_weights") and not POLICY_LOSSES.meta("dapo", "own_is_weights", False)


@pytest.mark.slow
@pytest.mark.parametrize("options", [["grpo.loss_type=luspo", "grpo.importance_sampling_level=sequence"],
                                     ["grpo.loss_type=vespo"]])
def test_train_with_luspo_and_vespo(options, tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    assert main(["train", *tiny_overrides(run_dir, "log.wandb_mode=disabled", "max_steps=2", "method=oisd",
                                          "grpo.num_iterations=2", *options)]) == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [r["step"] for r in rows] == [1, 2]
    assert_gradients_flowed(rows)
    assert_alignment_in_view(rows)
