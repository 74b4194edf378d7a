"""Two parts of the objective against independent references, on a real tiny transformers model:
the KL penalty (grpo.beta > 0 adds exactly beta times the k3 KL, in value and in gradient) and a
multi-layer OISD objective (the mean of its one-layer objectives, in value and in gradient)."""

from __future__ import annotations

import copy

import pytest
import torch

from oisd_lab.config import compose
from oisd_lab.module import OISDModule
from oisd_lab.rollout import generate
from oisd_lab.sampler import Sampler
from oisd_lab.sources import load_source

C = 8  # completion length


def _module(model, tok, *overrides, ref_model=None):
    cfg = compose(["grpo.prompts_per_step=4", "grpo.num_generations=4", f"grpo.max_completion_length={C}",
                   "grpo.loss_type=dapo", *overrides])
    source = load_source(cfg.task)
    return OISDModule(cfg, model, tok, Sampler(cfg, model, tok, source, source.reward), ref_model=ref_model), source


def _batch(module, source):
    torch.manual_seed(0)
    problems = source.train_batch(0, 4, 0)
    rollout = generate(module.policy, module.tokenizer, [p.prompt for p in problems], 4, C)
    part = rollout.select(slice(0, len(rollout)))
    norm = dict(num_items_in_batch=part.completion_mask.sum(), num_sequences=len(part), max_completion_length=C)
    adv = torch.linspace(-1.5, 1.5, len(part))
    return part, adv, norm


def _loss_and_grads(module, part, adv, norm, key):
    module.policy.zero_grad(set_to_none=True)
    terms = module.loss_terms(part.scored(adv), norm)
    terms[key].backward()
    grads = {n: p.grad.clone() for n, p in module.policy.named_parameters() if p.grad is not None}
    return float(terms[key].detach()), grads, terms


def _token_logps(model, part, temperature):
    """Plain per-token log-probs [b, C] of the completion: one forward, log-softmax, gather."""
    logits = model(input_ids=part.input_ids, attention_mask=part.attention_mask).logits.float()
    P = part.prompt_length
    logits = logits[:, P - 1:P - 1 + part.completion_ids.shape[1]] / temperature
    return torch.log_softmax(logits, -1).gather(-1, part.completion_ids[..., None])[..., 0]


def test_beta_adds_exactly_beta_times_the_k3_kl_in_value_and_gradient(tiny_model, char_tokenizer):
    beta = 0.3
    ref = copy.deepcopy(tiny_model).eval().requires_grad_(False)
    with_kl, source = _module(tiny_model, char_tokenizer, "method=grpo", f"grpo.beta={beta}", ref_model=ref)
    without, _ = _module(tiny_model, char_tokenizer, "method=grpo", "grpo.beta=0")
    part, adv, norm = _batch(with_kl, source)
    torch.manual_seed(1)
    with torch.no_grad():  # move the policy away from the reference, so the KL and its gradient are not 0
        for p in tiny_model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    loss_kl, grads_kl, terms = _loss_and_grads(with_kl, part, adv, norm, "loss/policy")
    loss_0, grads_0, _ = _loss_and_grads(without, part, adv, norm, "loss/policy")

    # reference: k3 = exp(r - l) - (r - l) - 1 per completion token, dapo-averaged over the batch's tokens
    tiny_model.zero_grad(set_to_none=True)
    T, mask = with_kl.cfg.grpo.temperature, part.completion_mask
    logp = _token_logps(tiny_model, part, T)
    with torch.no_grad():
        ref_logp = _token_logps(ref, part, T)
    k3 = torch.exp(ref_logp - logp) - (ref_logp - logp) - 1
    kl_loss = beta * (k3 * mask).sum() / mask.sum()
    kl_loss.backward()
    kl_grads = {n: p.grad for n, p in tiny_model.named_parameters() if p.grad is not None}

    assert float(kl_loss.detach()) > 1e-4  # the case has a KL to find
    assert loss_kl - loss_0 == pytest.approx(float(kl_loss.detach()), rel=1e-4)
    assert float(terms["sum/kl"]) == pytest.approx(float((k3 * mask).sum()), rel=1e-4)
    moved = 0
    for name, g in kl_grads.items():
        torch.testing.assert_close(grads_kl[name] - grads_0[name], g, rtol=1e-3, atol=1e-7, msg=name)
        moved += float(g.abs().max()) > 1e-6
    assert moved > 10  # the KL gradient reaches the weights


@pytest.mark.parametrize("channel, preset", [("think", "oisd_logit"), ("attn", "oisd_attn")])
def test_a_two_layer_objective_is_the_mean_of_its_one_layer_objectives(tiny_model, char_tokenizer, channel,
                                                                        preset):
    both, source = _module(tiny_model, char_tokenizer, f"method={preset}", "method.layers=[2,4]")
    assert both.student_layers == [2, 4]
    part, adv, norm = _batch(both, source)
    key = f"loss/{channel}"
    loss, grads, _ = _loss_and_grads(both, part, adv, norm, key)
    ones = []
    for layer in (2, 4):
        one, _ = _module(tiny_model, char_tokenizer, f"method={preset}", f"method.layers=[{layer}]")
        assert one.student_layers == [layer]
        ones.append(_loss_and_grads(one, part, adv, norm, key)[:2])
    (loss_2, grads_2), (loss_4, grads_4) = ones
    assert abs(loss_2 - loss_4) > 1e-4 * max(abs(loss_2), abs(loss_4))  # the layers differ, so the mean can fail
    assert loss == pytest.approx((loss_2 + loss_4) / 2, rel=1e-5, abs=1e-9)
    assert grads.keys() == grads_2.keys() | grads_4.keys()
    for name, g in grads.items():
        expected = (grads_2.get(name, torch.zeros_like(g)) + grads_4.get(name, torch.zeros_like(g))) / 2
        torch.testing.assert_close(g, expected, rtol=1e-4, atol=1e-8, msg=name)
