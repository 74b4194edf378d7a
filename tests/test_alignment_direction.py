"""benchmarks/alignment_direction.py: its think-term gradients against a naive one-pass reference,
the cancellation of signed weighting on identical rollouts, and its rollout statistics by hand."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from test_alignment_options import _module, _rollout

from oisd_lab import losses
from oisd_lab import step as step_lib
from oisd_lab.gradient_view import grad_cosine, grad_norm

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "alignment_direction.py"
_spec = importlib.util.spec_from_file_location("alignment_direction", _PATH)
direction = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(direction)


def _naive(module, rollout, adv, weights, agg):
    """One forward of the whole rollout; L = token mean (dapo) or sequence mean (grpo) of w_i d_it."""
    params = [p for p in module.policy.parameters() if p.requires_grad]
    out = step_lib.policy_forward(module.policy, rollout, hidden_layers=module.student_layers)
    mask = rollout.completion_mask
    k, m = module.student_layers[0], module.objective.method
    lens = module.readout.for_layer(k, m.lens_grad, norm=m.lens_norm)  # plain: whole [B, C, V] logits
    d = losses.jsd(out.logits.detach(), lens(out.hidden[k]), m.jsd_beta, module.objective.jsd_temperature)
    wd = weights[:, None] * d * mask
    loss = wd.sum() / mask.sum() if agg == "dapo" else (wd.sum(1) / mask.sum(1)).mean()
    return torch.autograd.grad(loss, params, allow_unused=True)


@pytest.mark.parametrize("weighting, agg", [("signed", "dapo"), ("signed", "grpo"), ("unsigned", "dapo"),
                                            ("uniform", "grpo")])
def test_think_gradient_matches_one_pass_reference(tiny_model, char_tokenizer, weighting, agg):
    module = _module(tiny_model, char_tokenizer, "method=oisd", "grpo.micro_batch_size=4")
    rollout = _rollout([6, 3, 8, 5, 2, 7, 8, 4] * 2, [0, 1, 2, 0] * 4)
    adv = torch.tensor([1.5, -0.5, -0.5, -0.5, 0.0, 0.0, 0.0, 0.0, 0.9, 0.9, -0.9, -0.9, 1.2, -1.2, 0.3, -0.3])
    weights = {"signed": adv, "unsigned": adv.abs(), "uniform": torch.ones_like(adv)}[weighting]
    ref = _naive(module, rollout, adv, weights, agg)
    got = direction.think_gradient(module, rollout, adv, weighting, agg)  # 4 micro-batches, rows sorted
    assert grad_norm(got) > 0
    assert grad_norm(got) == pytest.approx(grad_norm(ref), rel=1e-5)
    assert grad_cosine(got, ref) == pytest.approx(1.0, abs=1e-6)
    assert module.objective.method.name == "oisd" and module.objective.method.weighting == "signed"  # restored


def test_signed_weighting_cancels_on_identical_rollouts(tiny_model, char_tokenizer):
    """Advantages sum to zero in a group, so identical rollouts give no signed gradient under either
    aggregator, while the pull (uniform weighting) is not zero."""
    module = _module(tiny_model, char_tokenizer, "method=oisd")
    rollout = _rollout([6, 3, 8, 5], [0, 1, 2, 0]).take(torch.tensor([0, 0, 0, 0]))
    adv = torch.tensor([1.5, -0.5, -0.5, -0.5])
    pull = direction.think_gradient(module, rollout, adv, "uniform", "dapo")
    for agg in ("dapo", "grpo"):
        signed = direction.think_gradient(module, rollout, adv, "signed", agg)
        assert grad_norm(signed) < 1e-6 * grad_norm(pull)


def test_length_stats_by_hand():
    adv = torch.tensor([1.0, -1.0, 0.0, 0.0])
    lengths = torch.tensor([10, 4, 7, 7])
    got = direction.length_stats(adv, lengths, 2)
    assert got["cov_adv_length"] == pytest.approx(6 / 4)  # centred lengths [3, -3, 0, 0]
    assert got["within_group_length_std"] == pytest.approx(1.5)  # stds 3 and 0
    assert got["frac_zero_adv_groups"] == 0.5
    assert (got["mean_length_pos"], got["mean_length_neg"], got["mean_length"]) == (10.0, 4.0, 7.0)
