"""The stabilisers of the GRPO family on hand-made tensors, against the frameworks' definitions:
TRL's two-sided clip `delta` and `use_bias_correction_kl` (trl/trainer/grpo_trainer.py
`_compute_loss`, TRL 0.26), verl's dual clip `clip_ratio_c` (`compute_policy_loss_vanilla`) and
KL estimators (`kl_penalty`, `kl_penalty_forward`), verl commit
b178a3cd56f58b2d502255daba591e92833930a7; each at its neutral value leaves the loss and its
gradient exactly as before, and training runs with each."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import assert_alignment_in_view, assert_gradients_flowed, tiny_overrides

from oisd_lab import losses
from oisd_lab.cli import main
from oisd_lab.config import ConfigError, compose

RATIO = torch.tensor([[0.5, 0.9, 1.0, 1.3, 6.0], [0.1, 1.1, 2.5, 5.0, 0.7]], dtype=torch.float64)
ADV = torch.tensor([1.5, -2.0], dtype=torch.float64)


def test_delta_caps_the_unclipped_ratio_as_trl():
    coef_1 = RATIO
    coef_2 = coef_1.clamp(0.8, 1.28)
    want = -torch.min(coef_1.clamp(max=4.0) * ADV[:, None], coef_2 * ADV[:, None])
    got, _ = losses.ppo_clip(RATIO, ADV, 0.2, 0.28, delta=4.0)
    torch.testing.assert_close(got, want)
    # the negative-advantage token at ratio 5.0 loses 5.0 * 2 = 10 without delta, 8 with it
    assert float(losses.ppo_clip(RATIO, ADV, 0.2, 0.28)[0][1, 3]) == pytest.approx(10.0)
    assert float(got[1, 3]) == pytest.approx(8.0)


def test_dual_clip_bounds_negative_advantage_losses_as_verl():
    low, high, c = 0.2, 0.2, 3.0
    a = ADV[:, None].expand_as(RATIO)
    pg1 = -a * RATIO
    pg2 = -a * RATIO.clamp(1 - low, 1 + high)
    clip1 = torch.maximum(pg1, pg2)
    clip2 = torch.min(-a * c, clip1)
    want = torch.where(a < 0, clip2, clip1)
    got, _ = losses.ppo_clip(RATIO, ADV, low, high, clip_ratio_c=c)
    torch.testing.assert_close(got, want)
    assert float(got[1, 3]) == pytest.approx(6.0)  # 5.0 x 2 capped at 3 x 2


def test_neutral_values_are_the_plain_surrogate_in_value_and_gradient():
    ratio = RATIO.clone().requires_grad_()
    plain, _ = losses.ppo_clip(ratio, ADV, 0.2, 0.28)
    neutral, _ = losses.ppo_clip(ratio, ADV, 0.2, 0.28, delta=None, clip_ratio_c=None)
    assert torch.equal(plain, neutral)
    (g1,) = torch.autograd.grad(plain.sum(), ratio)
    (g2,) = torch.autograd.grad(neutral.sum(), ratio)
    assert torch.equal(g1, g2)


LOGP = torch.tensor([[-1.0, -0.2, -3.0], [-0.5, -25.0, -2.0]], dtype=torch.float64)
REF = torch.tensor([[-1.2, -0.1, -2.0], [-0.5, -0.3, -40.0]], dtype=torch.float64)


def _verl_forward(logprob, ref, name):
    if name in ("kl", "k1"):
        return logprob - ref
    if name == "abs":
        return (logprob - ref).abs()
    if name in ("mse", "k2"):
        return 0.5 * (logprob - ref).square()
    kl = (ref - logprob).clamp(-20, 20)
    return (torch.exp(kl) - kl - 1).clamp(-10, 10)  # low_var_kl / k3


@pytest.mark.parametrize("ours, verl", [("k1", "k1"), ("abs", "abs"), ("k2", "k2"), ("low_var_kl", "low_var_kl")])
def test_kl_estimators_match_verl_in_range(ours, verl):
    inside = (LOGP - REF).abs() <= 20  # our log-ratio is clamped to +-20 for every estimator
    got = losses.kl_estimate(LOGP, REF, ours)
    torch.testing.assert_close(got[inside], _verl_forward(LOGP, REF, verl)[inside])


def test_k3_is_trls_unclamped_estimator_and_low_var_kl_clamps_it():
    d = (REF - LOGP).clamp(-20, 20)
    trl = torch.exp(d) - d - 1
    torch.testing.assert_close(losses.kl_estimate(LOGP, REF, "k3"), trl)
    assert float(trl[1, 1]) > 10 and float(losses.kl_estimate(LOGP, REF, "low_var_kl")[1, 1]) == 10.0


@pytest.mark.parametrize("name", ["k1+", "k3+", "low_var_kl+"])
def test_straight_through_keeps_the_value_and_takes_k2s_gradient(name):
    logp = LOGP.clone().requires_grad_()
    value = losses.kl_estimate(logp, REF, name)
    torch.testing.assert_close(value, losses.kl_estimate(LOGP, REF, name.rstrip("+")))
    (g,) = torch.autograd.grad(value.sum(), logp)
    torch.testing.assert_close(g, LOGP - REF)  # d/dlogp of (logp - ref)^2 / 2, unclamped as verl


def test_bias_corrected_kl_is_the_kl_times_the_ratio(tiny_model, char_tokenizer):
    from test_alignment_options import _rollout

    from oisd_lab import step as step_lib
    from oisd_lab.module import OISDModule
    from oisd_lab.sampler import Sampler
    from oisd_lab.sources import load_source

    rollout = _rollout([6, 3, 8, 5], [0, 1, 2, 0])
    terms = {}
    for flag in (False, True):
        cfg = compose(["grpo.prompts_per_step=1", "grpo.num_generations=4", "grpo.max_completion_length=8",
                       "grpo.beta=0.5", f"grpo.use_bias_correction_kl={str(flag).lower()}", "method=grpo"])
        source = load_source(cfg.task)
        module = OISDModule(cfg, tiny_model, char_tokenizer, Sampler(cfg, tiny_model, char_tokenizer, source, source.reward),
                            ref_model=tiny_model)
        old = step_lib.old_policy_logps(tiny_model, rollout, module.objective, 4) - 0.05 * rollout.completion_mask
        part = type(rollout)(**{**rollout.__dict__, "old_logps": old})
        out = module.objective.forward(tiny_model, part)
        ref = step_lib.reference_logps(tiny_model, part, cfg.grpo.temperature) - 0.1 * rollout.completion_mask
        norm = dict(num_items_in_batch=rollout.completion_mask.sum(), num_sequences=4, max_completion_length=8)
        terms[flag] = step_lib.loss_terms(out, part.scored(torch.tensor([1.0, -1.0, 0.5, -0.5])), norm,
                                          module.objective, ref_logps=ref)
    logps = step_lib.old_policy_logps(tiny_model, rollout, module.objective, 4)
    mask = rollout.completion_mask
    kl = losses.kl_k3(logps, ref)
    ratio = torch.exp(logps - old)
    torch.testing.assert_close(terms[False]["sum/kl"], (kl * mask).sum(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms[True]["sum/kl"], (kl * ratio * mask).sum(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("checkpointed", [False, True])
def test_entropy_bonus_subtracts_coef_times_the_aggregated_entropy(tiny_model, char_tokenizer, checkpointed,
                                                                  monkeypatch):
    """verl's entropy_coeff: L = L_policy - c x agg(H), in value and gradient (H of the whole logits)."""
    from test_alignment_options import _module, _rollout

    monkeypatch.setattr(losses, "LENS_CHECKPOINT_MIN_ELEMENTS", 0 if checkpointed else 1 << 40)
    rollout = _rollout([6, 3, 8, 5, 2, 7, 8, 4], [0, 1, 2, 0] * 2)
    adv = torch.linspace(-1.0, 1.0, 8)
    grads = {}
    for coef in (0.0, 0.3):
        module = _module(tiny_model, char_tokenizer, "method=grpo", "grpo.prompts_per_step=2",
                         "grpo.micro_batch_size=8", "grpo.temperature=0.8", f"grpo.entropy_coef={coef}")
        tiny_model.zero_grad(set_to_none=True)
        sums = module.accumulate(rollout.scored(adv), backward=torch.Tensor.backward)
        grads[coef] = (sums, {n: p.grad.clone() for n, p in tiny_model.named_parameters() if p.grad is not None})
    out = module.objective.forward(tiny_model, rollout)
    mask = rollout.completion_mask
    z = out.logits.float() / 0.8
    H = -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1)
    bonus = -0.3 * (H * mask).sum() / mask.sum()  # dapo: token mean over the batch
    diff = float(grads[0.3][0]["loss/policy"]) - float(grads[0.0][0]["loss/policy"])
    assert diff == pytest.approx(float(bonus), rel=1e-4, abs=1e-6)
    tiny_model.zero_grad(set_to_none=True)
    bonus.backward()
    flowed = 0
    for name, g in grads[0.3][1].items():
        want = grads[0.0][1][name] + dict(tiny_model.named_parameters())[name].grad
        torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-6)
        flowed += int(dict(tiny_model.named_parameters())[name].grad.abs().sum() > 0)
    assert flowed > 0


def test_bad_values_are_one_line_errors():
    for override, field in (("grpo.delta=0.9", "grpo.delta"), ("grpo.clip_ratio_c=1.0", "grpo.clip_ratio_c"),
                            ("grpo.kl_estimator=k4", "grpo.kl_estimator")):
        with pytest.raises(ConfigError, match=field):
            compose([override])


@pytest.mark.slow
@pytest.mark.parametrize("options", [["grpo.delta=4.0", "grpo.num_iterations=2"], ["grpo.clip_ratio_c=3.0"],
                                     ["grpo.beta=0.04", "grpo.kl_estimator=low_var_kl+", "grpo.use_bias_correction_kl=true"],
                                     ["grpo.steps_per_generation=2"],
                                     ["grpo.use_adaptive_entropy=true", "grpo.entropy_target=100"]])
def test_train_with_each_stabiliser(options, tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    assert main(["train", *tiny_overrides(run_dir, "log.wandb_mode=disabled", "max_steps=2", "method=oisd",
                                          *options)]) == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [r["step"] for r in rows] == [1, 2]
    assert_gradients_flowed(rows)
    assert_alignment_in_view(rows)


def test_off_policy_mask_keeps_positive_and_low_kl_negative_rows():
    """The mask on a hand-made case: rows with mean log-ratio 1.0 (A > 0), 0.2 and 1.2 (A < 0)."""
    logps = torch.full((3, 2), -2.0)
    sampling = torch.tensor([[-1.0, -1.0], [-1.8, -1.8], [-0.8, -0.8]])
    adv = torch.tensor([1.0, -1.0, -1.0])
    mask = torch.ones(3, 2)
    got = losses.off_policy_mask(adv, logps, sampling, mask, 0.5)
    assert got.tolist() == [[1.0], [1.0], [0.0]]
    padded = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 1.0]])  # padding does not count in the mean
    sampling_padded = sampling.clone()
    sampling_padded[0, 1] = 50.0
    assert losses.off_policy_mask(adv, logps, sampling_padded, padded, 0.5).tolist() == [[1.0], [1.0], [0.0]]
    # only a negative advantage is masked: a zero one is kept at any log-ratio
    assert losses.off_policy_mask(torch.tensor([0.0, 0.0, -1.0]), logps, sampling, mask, 0.5).tolist() == [
        [1.0], [1.0], [0.0]]


@pytest.mark.slow
def test_train_with_the_off_policy_mask(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    assert main(["train", *tiny_overrides(run_dir, "log.wandb_mode=disabled", "max_steps=2", "method=oisd",
                                          "grpo.num_iterations=2", "grpo.off_policy_mask_threshold=0.0")]) == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert_gradients_flowed(rows)
    assert_alignment_in_view(rows)


def test_the_step_drops_the_masked_rows_from_the_policy_loss(tiny_model, char_tokenizer):
    from test_alignment_options import _module, _rollout

    from oisd_lab import step as step_lib

    rollout = _rollout([6, 3, 8, 5, 2, 7, 8, 4], [0, 1, 2, 0] * 2)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 1.0, -1.0, 0.5, -0.5])
    plain = _module(tiny_model, char_tokenizer, "method=grpo", "grpo.prompts_per_step=2")
    logps = step_lib.old_policy_logps(tiny_model, rollout, plain.objective, 8)
    shift = torch.tensor([0.0, 0.3, 0.0, 0.01, 0.0, 0.2, 0.0, 0.0])[:, None] * rollout.completion_mask
    part = type(rollout)(**{**rollout.__dict__, "old_logps": logps + shift})  # rows 1 and 5 drifted
    masked = _module(tiny_model, char_tokenizer, "method=grpo", "grpo.prompts_per_step=2",
                     "grpo.off_policy_mask_threshold=0.1")
    norm = plain.normalisers(part)
    out = plain.objective.forward(tiny_model, part)
    got = step_lib.loss_terms(out, part.scored(adv), norm, masked.objective)["loss/policy"]
    current = step_lib.old_policy_logps(tiny_model, part, plain.objective, 8)  # the policy now, no grad
    per_tok, _ = losses.policy_loss(current, part.old_logps, adv, part.completion_mask, "dapo")
    keep = torch.tensor([1, 0, 1, 1, 1, 0, 1, 1.0])[:, None]
    want = losses.aggregate(per_tok * keep, part.completion_mask, "dapo", **norm)
    torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-7)


def test_adaptive_entropy_control_moves_the_coefficient_as_trls_controller(tiny_model, char_tokenizer):
    """TRL's controller, written out: applied = coef if the last step's entropy <= target else 0;
    after the step coef += delta if its entropy <= target else -= delta, within [min, max]."""
    from test_iterations import _fit
    from test_iterations import _module as iter_module

    base = ["grpo.use_adaptive_entropy=true", "grpo.entropy_coef=0.01", "grpo.entropy_coef_delta=0.004",
            "grpo.entropy_coef_max=0.018", "grpo.lr=0.01"]
    for target in (100.0, 1.0, 0.0):  # always below, around, always above the tiny model's entropy
        module, _ = iter_module(tiny_model, char_tokenizer, *base, f"grpo.entropy_target={target}")
        rows = _fit(module, 4)
        coef, last, applied, after = 0.01, math.inf, [], []
        for r in rows:
            applied.append(coef if last <= target else 0.0)
            entropy = r["entropy"]  # the step's mean token entropy (one process)
            coef = min(max(coef + (0.004 if entropy <= target else -0.004), 0.0), 0.018)
            last = entropy
            after.append(coef)
        assert [r["entropy_coef_applied"] for r in rows] == pytest.approx(applied, abs=1e-12)
        assert [r["entropy_coef"] for r in rows] == pytest.approx(after, abs=1e-12)
        assert module.entropy_control == {"coef": pytest.approx(after[-1]), "last_entropy": pytest.approx(last)}
        if target == 100.0:
            assert after == pytest.approx([0.014, 0.018, 0.018, 0.018]) and applied[0] == 0.0 and applied[1] > 0
        if target == 0.0:
            assert set(applied) == {0.0} and after[-1] == 0.0
        # the controller's state travels in the checkpoint
        ckpt = {}
        module.on_save_checkpoint(ckpt)
        fresh, _ = iter_module(tiny_model, char_tokenizer, *base)
        fresh.on_load_checkpoint(ckpt)
        assert fresh.entropy_control == module.entropy_control


def test_an_applied_adaptive_coefficient_is_the_static_bonus(tiny_model, char_tokenizer):
    import dataclasses

    from test_alignment_options import _module, _rollout

    from oisd_lab import step as step_lib

    rollout = _rollout([6, 3, 8, 5, 2, 7, 8, 4], [0, 1, 2, 0] * 2)
    adv = torch.linspace(-1.0, 1.0, 8)
    static = _module(tiny_model, char_tokenizer, "method=grpo", "grpo.prompts_per_step=2", "grpo.entropy_coef=0.3")
    adaptive = _module(tiny_model, char_tokenizer, "method=grpo", "grpo.prompts_per_step=2",
                       "grpo.use_adaptive_entropy=true")
    objective = dataclasses.replace(adaptive.objective, entropy_coef=0.3)
    norm = static.normalisers(rollout)
    scored = rollout.scored(adv)
    want = step_lib.loss_terms(static.objective.forward(tiny_model, rollout), scored, norm, static.objective)
    got = step_lib.loss_terms(objective.forward(tiny_model, rollout), scored, norm, objective)
    torch.testing.assert_close(got["loss/policy"], want["loss/policy"])
    (g_want,) = torch.autograd.grad(want["loss/total"], tiny_model.model.norm.weight)
    (g_got,) = torch.autograd.grad(got["loss/total"], tiny_model.model.norm.weight)
    torch.testing.assert_close(g_got, g_want)
    assert dataclasses.replace(objective, policy_layer=2).entropy_bonus == 0.0  # BuPO's internal policy
