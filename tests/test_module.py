"""The module's loss wiring on a real tiny transformers model: micro-batching, zero-advantage
groups, signed weighting, and each preset's loss terms."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import fit_rows

from oisd_lab import losses
from oisd_lab.config import compose
from oisd_lab.module import OISDModule
from oisd_lab.rollout import Rollout, generate
from oisd_lab.sampler import Sampler
from oisd_lab.sources import load_source


def _module(tiny_model, tok, *overrides):
    cfg = compose(["grpo.prompts_per_step=4", "grpo.num_generations=4", "grpo.max_completion_length=8",
                   *overrides])
    source = load_source(cfg.task)
    return OISDModule(cfg, tiny_model, tok, Sampler(cfg, tiny_model, tok, source, source.reward)), source


def _rollout(module, source, seed=0):
    torch.manual_seed(seed)
    problems = source.train_batch(0, 4, 0)
    return generate(module.policy, module.tokenizer, [p.prompt for p in problems], 4, 8)


def _grads(module, rollout, adv, micro):
    """Gradient of one step's loss, micro-batched as the training step does it."""
    module.policy.zero_grad(set_to_none=True)
    module.cfg.grpo.micro_batch_size = micro
    module.accumulate(rollout.scored(adv), backward=torch.Tensor.backward)
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


@pytest.mark.parametrize("loss_type", ["dapo", "bnpo"])
def test_micro_batches_group_rows_of_similar_length(tiny_model, char_tokenizer, loss_type):
    module, source = _module(tiny_model, char_tokenizer, f"grpo.loss_type={loss_type}", "grpo.micro_batch_size=4")
    lengths = torch.tensor([8, 1, 5, 2, 7, 3, 8, 1, 4, 6, 2, 8, 1, 3, 5, 7.0])
    completion_mask = (torch.arange(8)[None] < lengths[:, None]).float()
    rollout = Rollout(input_ids=torch.randint(0, 50, (16, 11)),
                      attention_mask=torch.cat([torch.ones(16, 3), completion_mask], 1).long(),
                      completion_mask=completion_mask, prompt_length=3, texts=[f"row {i}" for i in range(16)],
                      truncated=lengths == 8)
    adv = torch.arange(16.0)
    parts = module.micro_batches(rollout.scored(adv))
    rows = torch.cat([p.advantages for p in parts]).long()  # adv = row number: which rows went where
    assert sorted(rows.tolist()) == list(range(16))
    for part in parts:  # advantages travel with their rows
        part_adv = part.advantages
        assert part.texts == [rollout.texts[i] for i in part_adv.long().tolist()]
        assert torch.equal(part.completion_mask.sum(1), lengths[part_adv.long()])
    padded = sum(p.completion_mask.numel() for p in parts)
    unsorted = sum(rollout.select(slice(lo, lo + 4)).completion_mask.numel() for lo in range(0, 16, 4))
    if loss_type == "bnpo":  # normalised per micro-batch: the grouping is part of the loss, kept
        assert rows.tolist() == list(range(16)) and padded == unsorted
    else:
        assert torch.equal(lengths[rows], lengths.sort(stable=True).values) and padded < unsorted


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
        terms = module.loss_terms(part.scored(sign * adv), norm)
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
    terms = module.loss_terms(rollout.select(slice(0, len(rollout))).scored(adv), norm)
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


def test_checkpoint_keeps_the_run_counters_and_an_older_checkpoint_starts_them_at_zero(tiny_model, char_tokenizer):
    module, _ = _module(tiny_model, char_tokenizer, "grpo.entropy_coef=0.01")
    module.num_tokens, module.skipped_steps = 1234, 3
    module.entropy_control.update(coef=0.02, last_entropy=1.5)
    module.previous_gradients.last = {"think": torch.ones(2)}
    saved: dict = {}
    module.on_save_checkpoint(saved)
    fresh, _ = _module(tiny_model, char_tokenizer, "grpo.entropy_coef=0.01")
    fresh.on_load_checkpoint(saved)
    assert (fresh.num_tokens, fresh.skipped_steps) == (1234, 3)
    assert fresh.entropy_control == {"coef": 0.02, "last_entropy": 1.5}
    assert fresh.previous_gradients.last.keys() == {"think"}
    # a checkpoint without these entries (written before they existed): counters from zero, the
    # entropy control as configured, no previous gradients; one without skipped_steps counts it from 0
    older, _ = _module(tiny_model, char_tokenizer, "grpo.entropy_coef=0.01")
    older.num_tokens, older.skipped_steps = 99, 9
    older.on_load_checkpoint({})
    assert (older.num_tokens, older.skipped_steps) == (0, 0)
    assert older.entropy_control == {"coef": 0.01, "last_entropy": math.inf}
    assert older.previous_gradients.last == {}
    older.on_load_checkpoint({"oisd_counters": {"num_tokens": 7}})
    assert (older.num_tokens, older.skipped_steps) == (7, 0)


@pytest.mark.parametrize("rows, size, count", [(5, 2, 3), (4, 2, 2), (3, 4, 1)])
def test_micro_batch_count_rounds_up(tiny_model, char_tokenizer, rows, size, count):
    """bnpo divides by the number of micro-batches: ceil(rows / micro_batch_size)."""
    module, _ = _module(tiny_model, char_tokenizer, f"grpo.micro_batch_size={size}")
    torch.manual_seed(0)
    rollout = generate(tiny_model, char_tokenizer, ["a"] * rows, 1, max_new_tokens=3)
    got = module.normalisers(rollout)
    assert got["num_micro_batches"] == count and isinstance(got["num_micro_batches"], int)
    assert got["num_sequences"] == rows and float(got["num_items_in_batch"]) == float(rollout.completion_mask.sum())


def test_logging_steps_are_the_first_every_nth_and_the_last(tiny_model, char_tokenizer):
    module, _ = _module(tiny_model, char_tokenizer, "log.every_n_steps=3", "max_steps=7")
    assert [s for s in range(1, 8) if module._is_log_step(s)] == [1, 3, 6, 7]


def test_rollout_metrics_by_hand(tiny_model, char_tokenizer):
    """Reward mean, the groups' mean standard deviation, completion lengths."""
    torch.manual_seed(0)
    rollout = generate(tiny_model, char_tokenizer, ["a", "b"], 2, max_new_tokens=5)
    rollout.completion_mask[0, 2:] = 0
    lengths = rollout.completion_mask.sum(1)
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5])
    module, _ = _module(tiny_model, char_tokenizer, "grpo.num_generations=2")
    got = module._rollout_metrics(rollout, rewards, rewards[:, None])
    assert got["reward"] == pytest.approx(0.5) and got["frac_reward_zero_std"] == 0.5
    assert got["reward_std"] == pytest.approx((2 ** 0.5 / 2 + 0.0) / 2)  # Bessel sd of {1, 0}, of {0.5, 0.5}
    assert got["completions/max_length"] == float(lengths.max()) and got["completions/mean_length"] == float(lengths.mean())


def test_the_learning_rate_warms_up_one_step_per_optimizer_step(tiny_model, char_tokenizer):
    """LambdaLR with grpo.warmup_steps=4: lr x min(1, (s + 1) / 5) after s optimizer steps."""
    module, _ = _module(tiny_model, char_tokenizer, "grpo.warmup_steps=4", "grpo.lr=0.01",
                        "grpo.prompts_per_step=1", "grpo.num_generations=2", "log.every_n_steps=100")
    rows = fit_rows(module, 3)
    # each step logs the rate its scheduler step leaves for the next: (s + 1) / 5 after s steps
    logged = [(r["step"], r["learning_rate"]) for r in rows if "learning_rate" in r]
    assert logged == [(1, pytest.approx(0.004)), (2, pytest.approx(0.006)), (3, pytest.approx(0.008))]
    assert module.trainer.global_step == 3
    assert module.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.01 * 4 / 5)
