"""The gradient view: its pure math by hand, and the per-term gradients on a tiny model against a
naive reference (one separate backward pass per term)."""

from __future__ import annotations

import math

import pytest
import torch
from test_alignment_options import _module, _rollout

from oisd_lab.gradient_view import (
    advantage_length_cov,
    divergence_means,
    frac_zero_advantage_groups,
    grad_cosine,
    grad_dot,
    grad_norm,
    reach_fraction,
)


def test_gradient_math_by_hand():
    a = [torch.tensor([3.0, 0.0]), None, torch.tensor([[4.0]])]
    b = [torch.tensor([1.0, 2.0]), torch.tensor([5.0]), torch.tensor([[0.0]])]
    assert grad_norm(a) == 5.0 and grad_dot(a, b) == 3.0
    assert grad_cosine(a, b) == pytest.approx(3.0 / (5.0 * math.sqrt(30.0)))
    assert grad_norm(b, where=a) == pytest.approx(math.sqrt(5.0))  # b without the entry a cannot reach
    assert grad_cosine(a, [None, None, None]) == 0.0
    params = [torch.zeros(2), torch.zeros(1), torch.zeros(1, 1)]
    assert reach_fraction(a, params) == 0.75


def test_rollout_statistics_by_hand():
    adv = torch.tensor([1.0, -1.0, 0.0, 0.0, 0.5, -0.5])
    lengths = torch.tensor([10.0, 4.0, 7.0, 7.0, 6.0, 8.0])
    # centred lengths [3, -3, 0, 0, -1, 1]; adv mean 0: (3 + 3 - 0.5 - 0.5) / 6
    assert advantage_length_cov(adv, lengths) == pytest.approx(5.0 / 6.0)
    assert advantage_length_cov(adv, lengths) == pytest.approx(float(torch.cov(torch.stack([adv, lengths]),
                                                                              correction=0)[0, 1]))
    assert frac_zero_advantage_groups(adv, 2) == pytest.approx(1 / 3)
    stats = {"stat/think/div_pos": torch.tensor(0.6), "stat/think/tokens_pos": torch.tensor(3.0),
             "stat/think/div_neg": torch.tensor(0.0), "stat/think/tokens_neg": torch.tensor(0.0)}
    assert divergence_means(stats) == {"grad/think/div_pos": pytest.approx(0.2)}  # empty split left out


def _naive(module, rollout, adv, micro):
    """Each term's weighted gradient from its own backward passes over the same micro-batches."""
    module.cfg.grpo.micro_batch_size = micro
    norm = module.normalisers(rollout)
    weights = {"policy": 1.0, "think": module.objective.logit_weight, "attn": module.objective.attn_weight}
    params = list(module.policy.parameters())
    grads = {}
    for name, weight in weights.items():
        module.policy.zero_grad(set_to_none=True)
        for part, part_adv in module.micro_batches(rollout, adv):
            (weight * module.loss_terms(part, part_adv, norm)[f"loss/{name}"]).backward()
        grads[name] = [None if p.grad is None else p.grad.clone() for p in params]
    return grads


@pytest.mark.parametrize("lens_grad, derive_policy", [("full", True), ("hidden_only", True), ("full", False)])
def test_gradient_view_matches_separate_backward_passes(tiny_model, char_tokenizer, lens_grad, derive_policy):
    module = _module(tiny_model, char_tokenizer, "method=oisd", "method.attn_weight=10",
                     f"method.lens_grad={lens_grad}")
    rollout = _rollout([6, 3, 8, 5, 2, 7, 8, 4] * 2, [0, 1, 2, 0] * 4)
    adv = torch.tensor([1.5, -0.5, -0.5, -0.5, 0.0, 0.0, 0.0, 0.0, 0.9, 0.9, -0.9, -0.9, 1.2, -1.2, 0.3, -0.3])
    ref = _naive(module, rollout, adv, micro=4)
    module.policy.zero_grad(set_to_none=True)
    view = module.gradient_view()
    assert view.derive_policy  # one process, no loss scaler: the policy gradient is .grad minus the rest
    view.derive_policy = derive_policy  # False: its own backward pass (DDP, GradScaler)
    sums = module.accumulate(rollout, adv, backward=torch.Tensor.backward, view=view)
    got = module.gradient_view_metrics(view, {k: v for k, v in sums.items() if k.startswith("stat/")},
                                       rollout, adv)
    for name in ("policy", "think", "attn"):
        assert got[f"grad/{name}/norm"] == pytest.approx(grad_norm(ref[name]), rel=1e-5)
        assert got[f"grad/{name}/reach"] == reach_fraction(ref[name], list(module.policy.parameters()))
    for name in ("think", "attn"):
        cos = grad_cosine(ref[name], ref["policy"])
        assert got[f"grad/{name}/cos_policy"] == pytest.approx(cos, rel=1e-4, abs=1e-6)
        assert got[f"grad/{name}/share"] == pytest.approx(grad_norm(ref[name]) / grad_norm(ref["policy"]), rel=1e-5)
        share_reach = grad_norm(ref[name]) / grad_norm(ref["policy"], where=ref[name])
        assert got[f"grad/{name}/share_reach"] == pytest.approx(share_reach, rel=1e-5)
    # the detached teacher keeps the layers above the student out of reach; hidden_only also the readout
    readout = module.policy.model.norm.weight
    index = [i for i, p in enumerate(module.policy.parameters()) if p is readout][0]
    assert got["grad/think/reach"] < 1.0 and (ref["think"][index] is None) == (lens_grad == "hidden_only")
    assert got["grad/frac_zero_adv_groups"] == 0.25 and got["time/gradient_view"] > 0
    assert {"grad/think/div_pos", "grad/think/div_neg", "grad/attn/div_zero"} <= got.keys()
    # the view leaves the update alone: .grad is the sum of the three terms' gradients
    for i, (name, p) in enumerate(module.policy.named_parameters()):
        parts = [ref[t][i] for t in ("policy", "think", "attn") if ref[t][i] is not None]
        torch.testing.assert_close(p.grad, sum(parts), rtol=1e-4, atol=1e-7, msg=name)
