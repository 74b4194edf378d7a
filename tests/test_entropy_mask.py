"""`grpo.top_entropy_quantile` (TRL's, arXiv 2506.01939): the mask against TRL's definition
(trl/trainer/grpo_trainer.py `get_high_entropy_mask`: entropy >= torch.quantile of the valid
tokens' entropies at 1 - q) on a hand-computed case, the policy loss restricted to those tokens in
value and gradient, 1.0 leaving the step exactly as it was, and a training run with 0.2."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_alignment_in_view, assert_gradients_flowed, tiny_overrides
from test_alignment_options import _module, _rollout

from oisd_lab import losses
from oisd_lab.cli import main


def test_top_20_percent_of_ten_valid_tokens_by_hand():
    entropy = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6], [0.7, 0.8, 0.9, 1.0, 1.1, 1.2]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    got = losses.high_entropy_mask(entropy, mask, 0.2)
    # valid entropies 0.1 .. 1.0; the 0.8 quantile is 0.82: 0.9 and 1.0 remain
    want = torch.zeros(2, 6, dtype=torch.bool)
    want[1, 2] = want[1, 3] = True
    assert torch.equal(got, want)
    assert torch.equal(losses.high_entropy_mask(entropy, mask, 1.0), mask.bool())
    assert not losses.high_entropy_mask(entropy, torch.zeros_like(mask), 0.5).any()


def _grads(module, rollout, adv):
    module.policy.zero_grad(set_to_none=True)
    sums = module.accumulate(rollout.scored(adv), backward=torch.Tensor.backward)
    return sums, {n: p.grad.clone() for n, p in module.policy.named_parameters() if p.grad is not None}


def test_the_policy_loss_keeps_only_high_entropy_tokens(tiny_model, char_tokenizer):
    rollout = _rollout([6, 3, 8, 5, 2, 7, 8, 4] * 2, [0, 1, 2, 0] * 4)
    adv = torch.linspace(-1.0, 1.0, 16)
    full = _module(tiny_model, char_tokenizer, "method=grpo", "grpo.micro_batch_size=16")
    top = _module(tiny_model, char_tokenizer, "method=grpo", "grpo.micro_batch_size=16", "grpo.top_entropy_quantile=0.3")
    neutral = _module(tiny_model, char_tokenizer, "method=grpo", "grpo.micro_batch_size=16", "grpo.top_entropy_quantile=1.0")
    s_full, g_full = _grads(full, rollout, adv)
    s_neutral, g_neutral = _grads(neutral, rollout, adv)
    assert all(torch.equal(g_full[n], g_neutral[n]) for n in g_full)  # 1.0: exactly today's step
    s_top, g_top = _grads(top, rollout, adv)
    # reference: the same loss with the mask applied by hand (dapo: token mean over the batch)
    out = full.objective.forward(tiny_model, rollout)
    mask = rollout.completion_mask
    logps, ent, _ = full.objective.head(out, rollout, students=False, entropy=True)
    keep = losses.high_entropy_mask(ent, mask, 0.3)
    assert 0 < int(keep.sum()) < int(mask.sum())
    per_tok, _ = losses.policy_loss(logps, None, adv, mask, "dapo")
    ref = (per_tok * keep * mask).sum() / mask.sum()
    torch.testing.assert_close(torch.as_tensor(s_top["loss/policy"]), ref.detach(), rtol=1e-5, atol=1e-7)
    tiny_model.zero_grad(set_to_none=True)
    ref.backward()
    for n, g in g_top.items():
        torch.testing.assert_close(g, dict(tiny_model.named_parameters())[n].grad, rtol=1e-4, atol=1e-7)
    assert any(not torch.allclose(g_top[n], g_full[n]) for n in g_full)


@pytest.mark.slow
def test_train_with_top_entropy_quantile(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    assert main(["train", *tiny_overrides(run_dir, "log.wandb_mode=disabled", "max_steps=2",
                                          "grpo.top_entropy_quantile=0.2", "method=oisd")]) == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [r["step"] for r in rows] == [1, 2]
    assert_gradients_flowed(rows)
    assert_alignment_in_view(rows)
