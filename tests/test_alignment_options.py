"""The choices the paper leaves open: each option reduces to the default behaviour at its default
and does what it says on hand-made tensors; bnpo across micro-batch sizes; the attention sink on
left-padded rows."""

from __future__ import annotations

import pytest
import torch
from test_losses import attention_maps, naive_row_jsd

from oisd_lab.config import ConfigError, compose
from oisd_lab.lens import find_readout
from oisd_lab.losses import (
    advantage_weights,
    aggregate,
    alignment_loss,
    alignment_scale,
    attention_row_jsd,
    divergence_sums,
    jsd,
)
from oisd_lab.module import OISDModule
from oisd_lab.rollout import Rollout
from oisd_lab.sampler import Sampler
from oisd_lab.sources import load_source
from oisd_lab.step import policy_forward


def _module(tiny_model, tok, *overrides):
    cfg = compose(["grpo.prompts_per_step=4", "grpo.num_generations=4", "grpo.max_completion_length=8",
                   *overrides])
    source = load_source(cfg.task)
    return OISDModule(cfg, tiny_model, tok, Sampler(cfg, tiny_model, tok, source, source.reward))


def _rollout(lengths: list[int], pads: list[int], seed: int = 0) -> Rollout:
    """A hand-made rollout: prompts of 5 tokens left-padded by `pads`, completions of `lengths`."""
    g = torch.Generator().manual_seed(seed)
    n, P, C = len(lengths), 5, 8
    prompt_mask = (torch.arange(P)[None] >= torch.tensor(pads)[:, None]).long()
    completion_mask = (torch.arange(C)[None] < torch.tensor(lengths)[:, None]).float()
    return Rollout(input_ids=torch.randint(3, 40, (n, P + C), generator=g),
                   attention_mask=torch.cat([prompt_mask, completion_mask.long()], 1),
                   completion_mask=completion_mask, prompt_length=P, texts=[""] * n,
                   truncated=torch.tensor(lengths) == C)


def _step(module, rollout, adv, micro, rewards=None):
    module.policy.zero_grad(set_to_none=True)
    module.cfg.grpo.micro_batch_size = micro
    sums = module.accumulate(rollout.scored(adv, rewards), backward=torch.Tensor.backward)
    return sums, {n: p.grad.clone() for n, p in module.policy.named_parameters() if p.grad is not None}


# --------------------------------------------------------------------------- bnpo


def test_bnpo_micro_batch_values_sum_to_the_whole_batch_value():
    per_token = torch.arange(16.0).reshape(4, 4)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0.0]])  # 5 + 5 tokens
    whole = aggregate(per_token, mask, "bnpo")
    halves = sum(aggregate(per_token[s], mask[s], "bnpo", num_micro_batches=2) for s in (slice(0, 2), slice(2, 4)))
    assert whole.item() == pytest.approx((0 + 1 + 2 + 4 + 5 + 8 + 9 + 12 + 13 + 14) / 10)
    assert halves.item() == pytest.approx(whole.item())


@pytest.mark.parametrize("method", ["grpo", "oisd"])
def test_bnpo_same_loss_and_gradient_for_every_micro_batch_size(tiny_model, char_tokenizer, method):
    module = _module(tiny_model, char_tokenizer, f"method={method}", "grpo.loss_type=bnpo")
    # every row holds 6 completion tokens, so every micro-batch holds the same token count
    rollout = _rollout([6] * 16, [0, 1, 2, 0] * 4)
    adv = torch.linspace(-1.0, 2.0, 16)  # mean 0.5: a policy loss of -0.5, not a rounding zero
    ref_sums, ref_grads = _step(module, rollout, adv, micro=16)
    assert ref_sums["loss/policy"].item() == pytest.approx(-0.5)
    assert len(ref_grads) > 10
    for micro in (8, 4, 2):
        sums, grads = _step(module, rollout, adv, micro=micro)
        for key in ("loss/policy", "loss/think", "loss/attn"):
            if key in ref_sums:
                torch.testing.assert_close(sums[key], ref_sums[key], rtol=1e-5, atol=1e-8, msg=key)
        for name in ref_grads:
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-7, msg=name)


# --------------------------------------------------------------------------- attention sink


def test_sink_is_the_first_real_key_of_a_left_padded_row():
    # row 0 unpadded (sink = key 0), row 1 padded by 2 (sink = key 2). Teacher and student differ
    # only in how much mass the sink takes: without it both rows are the same distribution.
    teacher = torch.tensor([[0.6, 0.3, 0.1, 0.0, 0.0], [0.0, 0.0, 0.7, 0.2, 0.1]], dtype=torch.float64)
    student = torch.tensor([[0.2, 0.6, 0.2, 0.0, 0.0], [0.0, 0.0, 0.4, 0.4, 0.2]], dtype=torch.float64)
    key_mask = torch.tensor([[True] * 5, [False, False, True, True, True]])
    query_mask = torch.ones(2, 1, dtype=torch.bool)
    t, s = teacher[:, None, None], student[:, None, None]  # [B, 1 head, 1 row, 5 keys]
    kept = attention_row_jsd(t, s, query_mask, key_mask, exclude_sink=True)
    torch.testing.assert_close(kept, torch.zeros(2, 1, dtype=torch.float64), atol=1e-12, rtol=0)
    assert (attention_row_jsd(t, s, query_mask, key_mask) > 0.01).all()  # the sink mass differs
    # the same as masking each row's sink by hand (key 0 of row 1 is a pad, not its sink)
    no_sink_mask = key_mask.clone()
    no_sink_mask[0, 0] = no_sink_mask[1, 2] = False
    torch.testing.assert_close(kept, attention_row_jsd(t, s, query_mask, no_sink_mask))


@pytest.mark.parametrize("head_reduce", ["mean", "per_head", "per_head_to_mean"])
@pytest.mark.parametrize("head_agg", ["mean", "sum"])
def test_attention_head_options_match_the_naive_loop(head_reduce, head_agg):
    key_mask = torch.tensor([[True] * 5, [False, False, True, True, True]])  # row 1 padded by 2
    query_mask = torch.tensor([[False, True, True, True, True], [False, False, True, True, True]])
    teacher = attention_maps(30, key_mask=key_mask)
    student = attention_maps(31)
    got = attention_row_jsd(teacher, student, query_mask, key_mask, head_reduce, exclude_sink=True,
                            head_agg=head_agg)
    ref = naive_row_jsd(teacher, student, query_mask, key_mask, head_reduce == "per_head", True,
                        to_mean=head_reduce == "per_head_to_mean", head_sum=head_agg == "sum" and head_reduce != "mean")
    torch.testing.assert_close(got, ref, atol=1e-10, rtol=1e-8)


def test_per_head_to_mean_of_identical_heads_equals_head_mean():
    one = attention_maps(32, h=1)
    teacher = attention_maps(33)
    student = one.expand(2, 3, 5, 5)  # three copies of one head: its mean is that head
    query_mask = torch.ones(2, 5, dtype=torch.bool)
    torch.testing.assert_close(attention_row_jsd(teacher, student, query_mask, head_reduce="per_head_to_mean"),
                               attention_row_jsd(teacher, student, query_mask))


# --------------------------------------------------------------------------- weighting, schedule


def test_reward_weighting_and_divergence_sums_by_hand():
    adv, rewards = torch.tensor([1.0, -1.0, 0.0]), torch.tensor([1.0, 0.0, 1.0])
    assert advantage_weights(adv, "reward", rewards).tolist() == [1.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="rewards"):
        advantage_weights(adv, "reward")
    div = torch.tensor([[0.1, 0.3, 9.0], [0.2, 0.4, 0.6], [0.5, 1e4, 1e4]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0.0]])
    # reward: rows 0 and 2 count: (0.1 + 0.3 + 0.5) / 6 tokens under dapo
    got = alignment_loss(div, mask, adv, "reward", "dapo", rewards=rewards)
    assert got.item() == pytest.approx(0.9 / 6)
    sums = divergence_sums(div, mask, adv)
    assert sums["div_pos"].item() == pytest.approx(0.4) and sums["tokens_pos"].item() == 2
    assert sums["div_neg"].item() == pytest.approx(1.2) and sums["tokens_neg"].item() == 3
    assert sums["div_zero"].item() == pytest.approx(0.5) and sums["tokens_zero"].item() == 1


def test_alignment_schedules_by_hand():
    assert [alignment_scale(s) for s in (1, 50, 10**6)] == [1.0, 1.0, 1.0]
    assert [alignment_scale(s, "stop", 3) for s in (1, 3, 4, 9)] == [1.0, 1.0, 0.0, 0.0]
    assert [alignment_scale(s, "linear", 4) for s in (1, 2, 5, 6)] == [1.0, 0.75, 0.0, 0.0]
    with pytest.raises(ValueError, match="steps"):
        alignment_scale(1, "linear", 0)


def test_scheduled_objective_scales_the_weights_and_skips_stopped_work(tiny_model, char_tokenizer):
    module = _module(tiny_model, char_tokenizer, "method=oisd", "method.align_schedule=stop",
                     "method.align_schedule_steps=2")
    on, off = module.objective.scheduled(2), module.objective.scheduled(3)
    assert (on.logit_weight, on.attn_weight) == (1.0, pytest.approx(0.1))
    assert (off.logit_weight, off.attn_weight, off.hidden_layers, off.attn_layers) == (0.0, 0.0, [], [])
    linear = _module(tiny_model, char_tokenizer, "method=oisd", "method.align_schedule=linear",
                     "method.align_schedule_steps=4").objective.scheduled(2)
    assert linear.logit_weight == 0.75 and linear.total({"loss/policy": 1.0, "loss/think": 2.0}) == 2.5
    rollout, adv = _rollout([6, 3, 8, 5] * 4, [0, 1, 2, 0] * 4), torch.linspace(-1, 1, 16)
    module.objective = off
    sums, _ = _step(module, rollout, adv, micro=16)
    assert "loss/think" not in sums and "loss/attn" not in sums


# --------------------------------------------------------------------------- options in the module


def _terms(tiny_model, tok, *overrides, rewards=None):
    module = _module(tiny_model, tok, "method=oisd", *overrides)
    rollout = _rollout([6, 3, 8, 5] * 4, [0, 1, 2, 0] * 4)
    adv = torch.tensor([1.2, -0.4, 0.0, -0.8] * 4)
    sums, grads = _step(module, rollout, adv, micro=8, rewards=rewards)
    return sums, grads


@pytest.mark.parametrize("explicit", [
    ["method.think_weighting=signed", "method.attn_weighting=signed"],
    ["method.align_loss_type=dapo"],
    ["method.lens_norm=true", "method.attn_head_reduce=mean", "method.align_schedule=constant"],
])
def test_options_at_their_defaults_change_nothing(tiny_model, char_tokenizer, explicit):
    base_sums, base_grads = _terms(tiny_model, char_tokenizer)
    sums, grads = _terms(tiny_model, char_tokenizer, *explicit)
    assert sums.keys() == base_sums.keys()
    for key in sums:
        assert torch.equal(sums[key], base_sums[key]), key
    for name in grads:
        assert torch.equal(grads[name], base_grads[name]), name


def test_per_channel_weighting_and_alignment_aggregator(tiny_model, char_tokenizer):
    mixed, _ = _terms(tiny_model, char_tokenizer, "method.think_weighting=positive", "method.align_loss_type=grpo")
    positive, _ = _terms(tiny_model, char_tokenizer, "method.weighting=positive", "grpo.loss_type=grpo")
    signed, _ = _terms(tiny_model, char_tokenizer, "grpo.loss_type=grpo")
    dapo, _ = _terms(tiny_model, char_tokenizer)
    torch.testing.assert_close(mixed["loss/think"], positive["loss/think"])
    torch.testing.assert_close(mixed["loss/attn"], signed["loss/attn"])
    torch.testing.assert_close(mixed["loss/policy"], dapo["loss/policy"])  # policy keeps dapo
    assert not torch.allclose(mixed["loss/think"], dapo["loss/think"])


def test_reward_weighting_in_the_module(tiny_model, char_tokenizer):
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0] * 4)
    got, _ = _terms(tiny_model, char_tokenizer, "method.weighting=reward", rewards=rewards)
    # only rows 0, 4, 8, 12 pull (weight 1): their divergence sum over all tokens of the batch
    div = got["stat/think/div_pos"]  # rows with A > 0 are exactly the rewarded rows here
    torch.testing.assert_close(got["loss/think"], div / 88)  # 16 rows x mean length 5.5 tokens


def test_lens_without_final_norm(tiny_model, char_tokenizer):
    readout = find_readout(tiny_model)
    h = torch.randn(3, tiny_model.config.hidden_size)
    torch.testing.assert_close(readout.logits(h, 2, norm=False), tiny_model.lm_head(h))
    torch.testing.assert_close(readout.for_layer(2)(h), tiny_model.lm_head(tiny_model.model.norm(h)))
    normed, _ = _terms(tiny_model, char_tokenizer)
    raw, _ = _terms(tiny_model, char_tokenizer, "method.lens_norm=false")
    assert not torch.allclose(raw["loss/think"], normed["loss/think"])
    torch.testing.assert_close(raw["loss/attn"], normed["loss/attn"])  # attention has no lens


def _think_by_hand(module, rollout, adv, temperature):
    """L_think of `_terms`'s batch from the plain `jsd` (not the chunked path the step uses): the
    detached final logits and the lens of the student layer, both / temperature, signed weights,
    `dapo` over the batch's tokens."""
    (layer,) = module.student_layers
    mask = rollout.completion_mask
    with torch.no_grad():
        out = policy_forward(module.policy, rollout, hidden_layers=[layer])
        div = jsd(out.logits, module.readout.for_layer(layer)(out.hidden[layer]), 0.5, temperature)
    return (adv[:, None] * div * mask).sum() / mask.sum()


def test_jsd_temperature_sampling_is_the_sampling_temperature(tiny_model, char_tokenizer):
    hot = "grpo.temperature=0.7"
    word, word_grads = _terms(tiny_model, char_tokenizer, hot, "method.jsd_temperature=sampling")
    number, number_grads = _terms(tiny_model, char_tokenizer, hot, "method.jsd_temperature=0.7")
    one, one_grads = _terms(tiny_model, char_tokenizer, hot)
    assert word.keys() == number.keys()
    for key in word:
        assert torch.equal(word[key], number[key]), key
    assert word_grads.keys() == number_grads.keys()
    for name in word_grads:
        assert torch.equal(word_grads[name], number_grads[name]), name
    module = _module(tiny_model, char_tokenizer, "method=oisd", hot)
    rollout, adv = _rollout([6, 3, 8, 5] * 4, [0, 1, 2, 0] * 4), torch.tensor([1.2, -0.4, 0.0, -0.8] * 4)
    torch.testing.assert_close(word["loss/think"], _think_by_hand(module, rollout, adv, 0.7))
    torch.testing.assert_close(one["loss/think"], _think_by_hand(module, rollout, adv, 1.0))
    assert not torch.allclose(word["loss/think"], one["loss/think"], rtol=1e-3, atol=0)
    torch.testing.assert_close(word["loss/attn"], one["loss/attn"])  # the attention channel has no temperature
    assert any(not torch.allclose(word_grads[n], one_grads[n]) for n in word_grads)


def test_head_sum_is_heads_times_mean_in_the_module(tiny_model, char_tokenizer):
    mean, _ = _terms(tiny_model, char_tokenizer, "method.attn_heads=per_head_to_mean")
    total, _ = _terms(tiny_model, char_tokenizer, "method.attn_heads=per_head_to_mean",
                      "method.attn_head_reduce=sum")
    heads = tiny_model.config.num_attention_heads
    torch.testing.assert_close(total["loss/attn"], heads * mean["loss/attn"])


@pytest.mark.parametrize("override, field", [
    (["method.attn_head_reduce=sum"], "method.attn_head_reduce"),
    (["method.align_schedule=stop"], "method.align_schedule_steps"),
    (["method.think_weighting=abs"], "method.think_weighting"),
    (["method.align_loss_type=mean"], "method.align_loss_type"),
    (["method.attn_heads=max"], "method.attn_heads"),
    (["method.jsd_temperature=hot"], "method.jsd_temperature"),
    (["method.jsd_temperature=0"], "method.jsd_temperature"),
])
def test_bad_option_names_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")) as err:
        compose(["method=oisd", *override])
    assert "\n" not in str(err.value)


def test_rewards_travel_with_their_rows(tiny_model, char_tokenizer):
    module = _module(tiny_model, char_tokenizer, "grpo.micro_batch_size=4")
    lengths = torch.tensor([8, 1, 5, 2, 7, 3, 8, 1, 4, 6, 2, 8, 1, 3, 5, 7.0])
    rollout = _rollout(lengths.long().tolist(), [0] * 16)
    adv, rewards = torch.arange(16.0), torch.arange(16.0) * 10  # adv = row number, reward = 10 x row
    parts = module.micro_batches(rollout.scored(adv, rewards))
    assert sorted(torch.cat([p.advantages for p in parts]).tolist()) == adv.tolist()
    for part in parts:
        part_adv, part_rewards = part.advantages, part.rewards
        assert torch.equal(part_rewards, part_adv * 10)
        assert torch.equal(part.completion_mask.sum(1), lengths[part_adv.long()])
    assert all(p.rewards is None for p in module.micro_batches(rollout.scored(adv)))
