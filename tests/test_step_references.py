"""Parts of the step against independent references: the attention channel over several row blocks
of a long completion with left-padded prompts (against the attention weights transformers' own
eager attention returns, in value and gradient), the log-probs of the sampling policy that the
importance ratio divides by, and the sampler-mismatch weights and their metrics (by hand)."""

from __future__ import annotations

import math

import pytest
import torch

from oisd_lab import losses, step
from oisd_lab.config import compose
from oisd_lab.module import OISDModule
from oisd_lab.rollout import Rollout

P, C = 10, 150  # 150 completion rows: three blocks of step.ATTN_ROW_BLOCK
PADS = (0, 3, 6, 0)  # left padding of each row's prompt
LENGTHS = (150, 97, 64, 131)  # completion tokens up to and including EOS


def _rollout(vocab: int) -> Rollout:
    torch.manual_seed(0)
    ids = torch.randint(3, vocab, (len(PADS), P + C))
    attention = torch.ones(len(PADS), P + C, dtype=torch.long)
    completion = torch.zeros(len(PADS), C)
    for row, (pad, length) in enumerate(zip(PADS, LENGTHS, strict=True)):
        ids[row, :pad] = 0
        attention[row, :pad] = 0
        ids[row, P + length:] = 0
        attention[row, P + length:] = 0
        completion[row, :length] = 1
    return Rollout(ids, attention, completion, P, [""] * len(PADS), torch.zeros(len(PADS), dtype=torch.bool))


def _small_rollout(mask: torch.Tensor, **extra) -> Rollout:
    """A rollout of one prompt token and the completion `mask` [B, T]; `extra`: its log-prob fields."""
    B, T = mask.shape
    return Rollout(torch.zeros(B, 1 + T, dtype=torch.long), torch.ones(B, 1 + T), mask, 1, [""] * B,
                   torch.zeros(B, dtype=torch.bool), **extra)


def _eager_rows(model, part: Rollout, layer: int) -> torch.Tensor:
    """[b, H, C, S] attention weights of decoder layer `layer` (0-based) for the completion's query
    rows (outputs are read one position early: rows P-1 .. P+C-2), from transformers' eager
    attention."""
    model.set_attn_implementation("eager")
    try:
        out = model(input_ids=part.input_ids, attention_mask=part.attention_mask, output_attentions=True)
    finally:
        model.set_attn_implementation("sdpa")
    return out.attentions[layer][:, :, P - 1:P - 1 + C]


def _assert_grads_equal(model, got: dict) -> None:
    """`got` equals the reference's gradients now in `model`'s .grad, parameter by parameter (float32
    rounding relative to each parameter's largest entry), and more than 5 parameters moved."""
    moved = 0
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        scale = float(p.grad.abs().max())
        torch.testing.assert_close(got[name], p.grad, rtol=1e-3, atol=1e-3 * scale,
                                   msg=lambda m, name=name: f"{name}: {m}")
        moved += scale > 1e-7
    assert moved > 5 and got.keys() == {n for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("sink", [False, True])
@pytest.mark.parametrize("heads", ["mean", "per_head"])
def test_attention_channel_over_row_blocks_equals_the_eager_attention_reference(tiny_model, char_tokenizer,
                                                                                sink, heads):
    cfg = compose(["method=oisd_attn", "method.layers=[2]", f"method.attn_exclude_sink={str(sink).lower()}",
                   f"method.attn_heads={heads}"])
    module = OISDModule(cfg, tiny_model, char_tokenizer, None, None)
    objective = module.objective_at(1)
    part = _rollout(tiny_model.config.vocab_size)
    assert C > 2 * step.ATTN_ROW_BLOCK and len(list(step.attention_row_blocks(part))) == 3
    weights = torch.linspace(-1.0, 2.0, C)  # a signed weighting, so every row's gradient counts

    tiny_model.zero_grad(set_to_none=True)
    ours = step.attention_divergence(objective.forward(tiny_model, part), part, objective)[2]
    (ours * weights).sum().backward()
    got = {n: p.grad.clone() for n, p in tiny_model.named_parameters() if p.grad is not None}

    tiny_model.zero_grad(set_to_none=True)
    L = tiny_model.config.num_hidden_layers
    teacher = _eager_rows(tiny_model, part, L - 1).detach()
    student = _eager_rows(tiny_model, part, 1)  # hidden_states[2] is decoder layer 1's output
    want = losses.attention_row_jsd(teacher, student, query_mask=part.completion_mask.bool(),
                                    key_mask=part.attention_mask.bool(), head_reduce=heads, exclude_sink=sink)
    (want * weights).sum().backward()

    assert ours.shape == (len(PADS), C)
    # masked rows give 0; the random tiny model's layers differ a little (JSD up to ~3e-4 here)
    assert float(want.abs().min()) == 0.0 and float(want.abs().max()) > 1e-4
    # float32: the two paths' probabilities differ by rounding, which the JSD of close rows shows
    # as up to ~1e-7 absolute (measured 8e-8)
    torch.testing.assert_close(ours, want, rtol=1e-3, atol=2e-7)
    _assert_grads_equal(tiny_model, got)


def test_logit_channel_on_its_own_equals_the_lens_jsd_formula(tiny_model, char_tokenizer):
    """The `think` channel called without the step's shared vocabulary pass (as a channel of one's
    own would call it): per completion token, JSD(sg[p_L] || lens p_k) with the lens
    lm_head(norm(h_k)) from transformers' hidden states, by formula in float64, in value and
    gradient; and equal to what the step's shared pass hands the channel."""
    cfg = compose(["method=oisd", "method.layers=[2]"])
    objective = OISDModule(cfg, tiny_model, char_tokenizer, None, None).objective_at(1)
    part = _rollout(tiny_model.config.vocab_size)
    weights = torch.linspace(-1.0, 2.0, C)

    tiny_model.zero_grad(set_to_none=True)
    out = objective.forward(tiny_model, part)
    ours = step.think_divergence(out, part, objective)[2]
    shared = objective.head(out, part, students=True, entropy=False)[2][2]
    (ours * weights).sum().backward()
    got = {n: p.grad.clone() for n, p in tiny_model.named_parameters() if p.grad is not None}

    tiny_model.zero_grad(set_to_none=True)
    hidden = tiny_model(input_ids=part.input_ids, attention_mask=part.attention_mask,
                        output_hidden_states=True).hidden_states
    rows = slice(P - 1, P - 1 + C)  # the logits that predict the completion tokens
    teacher = tiny_model.lm_head(tiny_model.model.norm(hidden[-1][:, rows])).double().detach().softmax(-1)
    student = tiny_model.lm_head(tiny_model.model.norm(hidden[2][:, rows])).double().softmax(-1)
    mid = (teacher + student) / 2
    jsd = 0.5 * (teacher * (teacher / mid).log()).sum(-1) + 0.5 * (student * (student / mid).log()).sum(-1)
    want = jsd * part.completion_mask
    (want * weights).sum().backward()

    assert float(want.detach().max()) > 1e-4 and float(want.detach().min()) == 0.0
    torch.testing.assert_close(ours.double(), want, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(ours, shared, rtol=0, atol=0)
    _assert_grads_equal(tiny_model, got)


def test_the_sampling_policys_log_probs_by_hand():
    """The sampler's own log-probs where it gave them (vLLM), else the old policy's, else the
    current policy's, detached."""
    current = torch.tensor([[-1.0, -2.0, -3.0]], requires_grad=True)
    old = torch.tensor([[-1.5, -2.5, -3.5]])
    sampler = torch.tensor([[-0.5, float("nan"), -0.7]])

    def rollout(**extra) -> Rollout:
        return _small_rollout(torch.ones(1, 3), **extra)

    plain = step.sampling_logps(rollout(), current)
    assert plain.tolist() == [[-1.0, -2.0, -3.0]] and not plain.requires_grad
    assert step.sampling_logps(rollout(old_logps=old), current).tolist() == [[-1.5, -2.5, -3.5]]
    assert torch.equal(step.sampling_logps(rollout(sampler_logps=sampler), current),
                       torch.tensor([[-0.5, -2.0, -0.7]]))
    mixed = step.sampling_logps(rollout(sampler_logps=sampler, old_logps=old), current)
    assert torch.equal(mixed, torch.tensor([[-0.5, -2.5, -0.7]]))


def _vllm_rollout(mask: torch.Tensor, old: torch.Tensor, sampler: torch.Tensor) -> Rollout:
    return _small_rollout(mask, sampler_logps=sampler, old_logps=old)


def test_sampler_correction_weights_and_metrics_by_hand():
    """TRL's token_mask mode with clip [0.5, 2]: w = exp(old - sampler) per completion token, 0
    outside the clip; a token the sampler gave no log-prob (NaN) counts as matching (w = 1). The
    `sampling/*` metrics are over completion tokens only."""
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    old = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -9.0]])
    sampler = torch.tensor([[-1.5, float("nan"), -2.0], [-0.2, -1.1, 0.0]])
    grpo = compose(["grpo.vllm_importance_sampling_mode=token_mask", "grpo.vllm_importance_sampling_clip_min=0.5",
                    "grpo.vllm_importance_sampling_clip_max=2.0"]).grpo
    weights, stats = step.sampler_correction(_vllm_rollout(mask, old, sampler), grpo)
    # old - sampler on the mask: 0.5, 0 (NaN), -1.0 | -0.8, 0.1 (the padded token is not a token)
    w = [math.exp(0.5), 1.0, 0.0, 0.0, math.exp(0.1)]  # exp(-1) = 0.37 and exp(-0.8) = 0.45 are below 0.5
    assert weights[mask.bool()].tolist() == pytest.approx(w, rel=1e-6)
    assert stats["sampling/sampling_logp_difference/max"] == pytest.approx(1.0)
    assert stats["sampling/sampling_logp_difference/mean"] == pytest.approx((0.5 + 0 + 1.0 + 0.8 + 0.1) / 5)
    assert stats["sampling/importance_sampling_ratio/mean"] == pytest.approx(sum(w) / 5, rel=1e-6)
    assert stats["sampling/importance_sampling_ratio/min"] == 0.0
    assert stats["sampling/importance_sampling_ratio/max"] == pytest.approx(math.exp(0.5), rel=1e-6)

    # sequence level: one weight per completion, exp of the summed difference (0.5 + 0 - 1; -0.8 + 0.1)
    seq = compose(["grpo.vllm_importance_sampling_mode=sequence_truncate",
                   "grpo.vllm_importance_sampling_clip_max=3.0"]).grpo
    weights, stats = step.sampler_correction(_vllm_rollout(mask, old, sampler), seq)
    assert weights.shape == (2, 1)
    assert weights.flatten().tolist() == pytest.approx([math.exp(-0.5), math.exp(-0.7)], rel=1e-6)
    assert stats["sampling/importance_sampling_ratio/mean"] == pytest.approx((math.exp(-0.5) + math.exp(-0.7)) / 2)

    # no completion token at all: the metrics are NaN, not an error
    empty = torch.zeros(2, 3)
    _, stats = step.sampler_correction(_vllm_rollout(empty, old, sampler), grpo)
    assert all(math.isnan(v) for v in stats.values()) and len(stats) == 6
