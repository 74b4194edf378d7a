"""The module's loss wiring on a real tiny transformers model: micro-batching, zero-advantage
groups, signed weighting, and each preset's loss terms."""

from __future__ import annotations

import pytest
import torch

from oisd_lab import losses
from oisd_lab.config import compose
from oisd_lab.module import OISDModule
from oisd_lab.rollout import generate
from oisd_lab.sources import load_source


def _module(tiny_model, tok, *overrides):
    cfg = compose(["grpo.prompts_per_step=4", "grpo.num_generations=4", "grpo.max_completion_length=8",
                   *overrides])
    source = load_source(cfg.task)
    return OISDModule(cfg, tiny_model, tok, source, source.reward), source


def _rollout(module, source, seed=0):
    torch.manual_seed(seed)
    problems = source.train_batch(0, 4, 0)
    return generate(module.policy, module.tokenizer, [p.prompt for p in problems], 4, 8)


def _grads(module, rollout, adv, micro):
    module.policy.zero_grad(set_to_none=True)
    norm = dict(num_items_in_batch=rollout.completion_mask.sum(), num_sequences=len(rollout),
                max_completion_length=module.cfg.grpo.max_completion_length)
    for lo in range(0, len(rollout), micro):
        terms = module._loss_terms(rollout.select(slice(lo, lo + micro)), adv[lo : lo + micro], norm)
        terms["loss/total"].backward()
    return {n: p.grad.clone() for n, p in module.policy.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method", ["grpo", "oisd"])
@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_micro_batching_leaves_the_gradient_unchanged(tiny_model, char_tokenizer, method, loss_type):
    module, source = _module(tiny_model, char_tokenizer, f"method={method}", f"grpo.loss_type={loss_type}")
    rollout = _rollout(module, source)
    adv = torch.linspace(-1.5, 1.5, len(rollout))
    whole = _grads(module, rollout, adv, micro=16)
    split = _grads(module, rollout, adv, micro=4)
    assert whole.keys() == split.keys() and len(whole) > 10
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize("method", ["grpo", "oisd", "oisd_unsigned"])
def test_identical_rewards_give_zero_gradient(tiny_model, char_tokenizer, method):
    module, source = _module(tiny_model, char_tokenizer, f"method={method}")
    rollout = _rollout(module, source)
    adv = losses.group_advantages(torch.ones(len(rollout)), 4)
    assert torch.equal(adv, torch.zeros(len(rollout)))
    grads = _grads(module, rollout, adv, micro=16)
    assert all(float(g.abs().max()) == 0.0 for g in grads.values())


def test_signed_alignment_gradient_flips_with_the_advantage(tiny_model, char_tokenizer):
    module, source = _module(tiny_model, char_tokenizer, "method=oisd", "method.lens_grad=hidden_only")
    rollout = _rollout(module, source)
    adv = torch.linspace(0.5, 2.0, len(rollout))
    part = rollout.select(slice(0, len(rollout)))
    norm = dict(num_items_in_batch=part.completion_mask.sum(), num_sequences=len(part),
                max_completion_length=8)
    student = module.policy.model.layers[0].mlp.down_proj.weight  # below the student layer only
    grads = []
    for sign in (1.0, -1.0):
        module.policy.zero_grad(set_to_none=True)
        terms = module._loss_terms(part, sign * adv, norm)
        (terms["loss/think"] + terms["loss/attn"]).backward()
        grads.append(student.grad.clone())
    assert float(grads[0].abs().max()) > 0
    torch.testing.assert_close(grads[1], -grads[0], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("method, think, attn", [
    ("grpo", False, False), ("oisd_logit", True, False), ("oisd_attn", False, True),
    ("oisd", True, True), ("oisd_unsigned", True, True),
])
def test_each_preset_computes_exactly_its_loss_terms(tiny_model, char_tokenizer, method, think, attn):
    module, source = _module(tiny_model, char_tokenizer, f"method={method}")
    rollout = _rollout(module, source)
    adv = torch.linspace(-1.0, 1.0, len(rollout))
    norm = dict(num_items_in_batch=rollout.completion_mask.sum(), num_sequences=len(rollout),
                max_completion_length=8)
    terms = module._loss_terms(rollout.select(slice(0, len(rollout))), adv, norm)
    assert ("loss/think" in terms) == think and ("loss/attn" in terms) == attn
    m = module.cfg.method
    expected = terms["loss/policy"] + m.logit_weight * terms.get("loss/think", 0) + m.attn_weight * terms.get("loss/attn", 0)
    torch.testing.assert_close(terms["loss/total"], expected)
    if method == "oisd_unsigned":  # |A| weighting: every term pulls, so the loss is a positive JSD mean
        assert float(terms["loss/think"].detach()) > 0 and float(terms["loss/attn"].detach()) > 0


def test_default_student_layer_is_a_sixth_of_depth(tiny_model, char_tokenizer):
    module, _ = _module(tiny_model, char_tokenizer, "method=oisd")
    assert module.num_layers == 6 and module.student_layers == [1]
    module, _ = _module(tiny_model, char_tokenizer, "method=oisd", "method.layers=[-1,0.5]")
    assert module.student_layers == [3, 5]
