"""The chunked vocabulary head (`losses.chunked_head`, used by every training and scoring forward)
against the plain implementation on whole [N, V] logits: values and gradients of the log-probs,
the entropy and the lens JSD, with and without recomputation, an internal policy, masked (-inf)
vocabulary entries, 16-bit inputs, the real 151,936-token vocabulary, and the whole step (left
padding, groups of unequal length, the KL reference, `num_iterations`) with the plain head swapped in.
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_alignment_options import _module, _rollout

from oisd_lab import losses
from oisd_lab import step as step_lib
from oisd_lab.config import compose
from oisd_lab.module import OISDModule
from oisd_lab.sampler import Sampler
from oisd_lab.sources import load_source


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def plain_head(final_hidden, tokens, head, vocab, temperature=1.0, chunk_size=1024, students=(),
               jsd_beta=0.5, jsd_temperature=1.0, policy=None, entropy=True, entropy_grad=False):
    """The same outputs from whole [N, V] logits and plain autograd (no chunks, no closed forms)."""
    logits = head(final_hidden) if policy is None else head(final_hidden).detach()
    source = logits if policy is None else policy[1](policy[0])
    logp_all = torch.log_softmax(source.float() / temperature, dim=-1)
    logps = logp_all.gather(-1, tokens[:, None]).squeeze(-1)
    ent = None
    if entropy:
        z = (logits if entropy_grad else logits.detach()).float() / temperature
        p = torch.softmax(z, dim=-1)
        ent = -torch.where(p > 0, p * torch.log_softmax(z, -1), 0.0).sum(-1)
    divs = tuple(losses.jsd(logits.detach().float(), readout(h).float(), beta=jsd_beta, temperature=jsd_temperature)
                 for h, readout in students)
    return losses.HeadOutputs(logps, ent, divs)


def _parts(n=13, d=6, v=29, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    unembed = torch.nn.Linear(d, v, bias=False).to(dtype)
    norm = torch.nn.LayerNorm(d).to(dtype)
    final = torch.randn(n, d, generator=gen(seed + 1)).to(dtype).requires_grad_()
    students = [torch.randn(n, d, generator=gen(seed + 2 + i)).to(dtype).requires_grad_() for i in range(2)]
    tokens = torch.randint(0, v, (n,), generator=gen(seed + 9))
    return unembed, norm, final, students, tokens


def _scalar(out: losses.HeadOutputs, seed: int = 5) -> torch.Tensor:
    """A signed combination of every differentiable output (as advantages weight them)."""
    g = gen(seed)
    total = (out.logps * torch.randn(out.logps.shape, generator=g)).sum()
    for d in out.lens_jsd:
        total = total + (d * torch.randn(d.shape, generator=g)).sum()
    return total


def _compare(kwargs, params, rtol=1e-5, atol=1e-6, grad_rtol=1e-4, grad_atol=1e-6):
    ref = plain_head(**kwargs)
    got = losses.chunked_head(**kwargs)
    torch.testing.assert_close(got.logps, ref.logps, rtol=rtol, atol=atol)
    if ref.entropy is not None:
        torch.testing.assert_close(got.entropy, ref.entropy, rtol=rtol, atol=atol)
    assert len(got.lens_jsd) == len(ref.lens_jsd)
    for a, b in zip(got.lens_jsd, ref.lens_jsd, strict=True):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
    g_ref = torch.autograd.grad(_scalar(ref), params, allow_unused=True)
    g_got = torch.autograd.grad(_scalar(got), params, allow_unused=True)
    flowed = 0
    for a, b in zip(g_got, g_ref, strict=True):
        assert (a is None) == (b is None)
        if b is not None:
            torch.testing.assert_close(a, b, rtol=grad_rtol, atol=grad_atol)
            flowed += int(b.abs().sum() > 0)
    assert flowed >= 2  # gradients reached the hidden states and the weights
    return got


@pytest.mark.parametrize("checkpointed", [False, True])
@pytest.mark.parametrize("temperature, beta, jsd_temperature, chunk", [(1.0, 0.5, 1.0, 4), (0.7, 0.3, 1.6, 5),
                                                                       (1.3, 0.5, 0.7, 64)])
def test_chunked_head_matches_the_plain_head(checkpointed, temperature, beta, jsd_temperature, chunk, monkeypatch):
    monkeypatch.setattr(losses, "LENS_CHECKPOINT_MIN_ELEMENTS", 0 if checkpointed else 1 << 40)
    unembed, norm, final, students, tokens = _parts()
    lens = torch.nn.Sequential(norm, unembed)
    kwargs = dict(final_hidden=final, tokens=tokens, head=unembed, vocab=29, temperature=temperature,
                  chunk_size=chunk, students=tuple((h, lens) for h in students), jsd_beta=beta,
                  jsd_temperature=jsd_temperature)
    _compare(kwargs, [final, *students, unembed.weight, norm.weight, norm.bias])


@pytest.mark.parametrize("checkpointed", [False, True])
def test_the_closed_form_lens_gradient_is_formed_once_per_chunk_and_student(checkpointed, monkeypatch):
    """Under recomputation the first forward's saved tensors are discarded, so the closed-form
    gradient is formed only when backward recomputes a chunk: once per chunk and student, as
    without recomputation; a forward without backward forms none. Values and gradients as plain."""
    from oisd_lab.losses import divergence

    monkeypatch.setattr(losses, "LENS_CHECKPOINT_MIN_ELEMENTS", 0 if checkpointed else 1 << 40)
    formed = []
    real = divergence._closed_form_grad
    monkeypatch.setattr(divergence, "_closed_form_grad", lambda *a: formed.append(a[0].shape) or real(*a))
    unembed, norm, final, students, tokens = _parts()
    lens = torch.nn.Sequential(norm, unembed)
    kwargs = dict(final_hidden=final, tokens=tokens, head=unembed, vocab=29, chunk_size=4,
                  students=tuple((h, lens) for h in students))
    out = losses.chunked_head(**kwargs)
    assert len(formed) == (0 if checkpointed else 2 * 4)  # 13 rows: chunks of 4, 4, 4, 1
    _scalar(out).backward()
    assert sorted(formed) == sorted([torch.Size([4, 29])] * 6 + [torch.Size([1, 29])] * 2)
    formed.clear()
    for x in (final, *students):
        x.grad = None
    _compare(kwargs, [final, *students, unembed.weight, norm.weight, norm.bias])


@pytest.mark.parametrize("checkpointed", [False, True])
def test_internal_policy_reads_its_own_readout_and_the_final_layer_stays_the_teacher(checkpointed, monkeypatch):
    monkeypatch.setattr(losses, "LENS_CHECKPOINT_MIN_ELEMENTS", 0 if checkpointed else 1 << 40)
    unembed, norm, final, students, tokens = _parts(seed=3)
    lens = torch.nn.Sequential(norm, unembed)
    kwargs = dict(final_hidden=final, tokens=tokens, head=unembed, vocab=29, temperature=0.9, chunk_size=3,
                  students=((students[0], lens),), policy=(students[1], unembed))
    got = _compare(kwargs, [final, *students, unembed.weight, norm.weight])
    # the final hidden states get no gradient from the log-probs (only the teacher reads them)
    (g,) = torch.autograd.grad(got.logps.sum(), [final], allow_unused=True)
    assert g is None or float(g.abs().max()) == 0.0


def test_masked_vocabulary_entries_stay_finite(monkeypatch):
    """-inf logits (a banned part of the vocabulary) in the head and the student lens."""
    monkeypatch.setattr(losses, "LENS_CHECKPOINT_MIN_ELEMENTS", 0)
    unembed, norm, final, students, tokens = _parts(v=17, seed=7)
    banned = torch.zeros(17, dtype=torch.bool)
    banned[[0, 5, 6]] = True
    tokens = tokens.masked_fill(banned[tokens], 3)

    def head(h):
        return unembed(h).masked_fill(banned, float("-inf"))

    def lens(h):
        return head(norm(h))

    kwargs = dict(final_hidden=final, tokens=tokens, head=head, vocab=17, temperature=1.0, chunk_size=4,
                  students=((students[0], lens),))
    got = _compare(kwargs, [final, students[0], unembed.weight])
    assert torch.isfinite(got.logps).all() and torch.isfinite(got.entropy).all()
    assert torch.isfinite(got.lens_jsd[0]).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_inputs_are_read_in_float32(dtype, monkeypatch):
    monkeypatch.setattr(losses, "LENS_CHECKPOINT_MIN_ELEMENTS", 0)
    unembed, norm, final, students, tokens = _parts(dtype=dtype, seed=11)
    lens = torch.nn.Sequential(norm, unembed)
    kwargs = dict(final_hidden=final, tokens=tokens, head=unembed, vocab=29, chunk_size=4,
                  students=((students[0], lens),))
    got = losses.chunked_head(**kwargs)
    assert got.logps.dtype == torch.float32 and got.entropy.dtype == torch.float32
    # the same 16-bit logits, read whole: the chunks only change which rows share a matmul
    _compare(kwargs, [final, students[0], unembed.weight], rtol=2e-2, atol=2e-2, grad_rtol=5e-2, grad_atol=5e-2)


def test_empty_selection():
    unembed, _, final, _, _ = _parts()
    out = losses.chunked_head(final[:0], torch.zeros(0, dtype=torch.long), unembed, 29,
                              students=((final[:0], unembed),))
    assert out.logps.shape == (0,) and out.entropy.shape == (0,) and out.lens_jsd[0].shape == (0,)


@pytest.mark.slow
def test_real_vocabulary_recomputes_chunks_and_matches_the_plain_head():
    """V = 151,936 with 480 tokens: above the recomputation threshold, chunks of 110 rows as the step uses."""
    v, n = 151_936, 480
    assert n * v > losses.LENS_CHECKPOINT_MIN_ELEMENTS
    unembed, norm, final, students, tokens = _parts(n=n, d=8, v=v, seed=13)
    lens = torch.nn.Sequential(norm, unembed)
    kwargs = dict(final_hidden=final, tokens=tokens, head=unembed, vocab=v, chunk_size=step_lib.VOCAB_CHUNK_ELEMENTS // v,
                  students=((students[0], lens),))
    _compare(kwargs, [final, students[0], unembed.weight, norm.weight], grad_atol=1e-7)


# --------------------------------------------------------------------------- the whole step


def _grads(module, rollout, adv, micro):
    module.policy.zero_grad(set_to_none=True)
    module.cfg.grpo.micro_batch_size = micro
    sums = module.accumulate(rollout.scored(adv), backward=torch.Tensor.backward)
    return sums, {n: p.grad.clone() for n, p in module.policy.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("overrides", [
    ("method=oisd", "grpo.beta=0.04"),
    ("method=oisd", "grpo.num_iterations=2", "grpo.temperature=0.8"),
    ("method=grpo", "grpo.loss_type=grpo"),
    ("method=bupo",),
    ("method=oisd", "method.bupo_steps=0.5", "grpo.beta=0.04"),
    ("method=oisd", "grpo.entropy_coef=0.3"),
])
def test_training_step_equals_the_plain_head(tiny_model, char_tokenizer, overrides, monkeypatch):
    """Left-padded prompts and completions of unequal length in groups; micro-batches of 3 rows."""
    cfg = compose(["grpo.prompts_per_step=4", "grpo.num_generations=4", "grpo.max_completion_length=8", *overrides])
    source = load_source(cfg.task)
    ref = copy.deepcopy(tiny_model)
    with torch.no_grad():  # a reference that differs from the policy, so the KL is not 0
        for p in ref.parameters():
            p.add_(1e-2 * torch.randn(p.shape, generator=gen(4)))
    module = OISDModule(cfg, tiny_model, char_tokenizer, Sampler(cfg, tiny_model, char_tokenizer, source, source.reward),
                        ref_model=ref)
    module.objective = module.objective_at(1)  # BuPO's internal policy where it is on
    rollout = _rollout([6, 3, 8, 5, 2, 7, 8, 4] * 2, [0, 1, 2, 0] * 4)
    adv = torch.tensor([1.5, -0.5, -0.5, -0.5, 0.0, 0.3, 0.0, -0.3, 0.9, 0.9, -0.9, -0.9, 1.2, -1.2, 0.3, -0.3])
    if module.cfg.grpo.num_iterations > 1:
        rollout.old_logps = step_lib.old_policy_logps(module.policy, rollout, module.objective, 3)
        with torch.no_grad():  # one update's worth of drift, so the ratio is not 1
            for p in module.policy.parameters():
                p.add_(1e-3 * torch.randn(p.shape, generator=gen(2)))
    sums, grads = _grads(module, rollout, adv, 3)
    with monkeypatch.context() as patch:
        patch.setattr(losses, "chunked_head", plain_head)
        ref_sums, ref_grads = _grads(module, rollout, adv, 3)
    assert sums.keys() == ref_sums.keys()
    for key, value in ref_sums.items():
        torch.testing.assert_close(torch.as_tensor(sums[key]), torch.as_tensor(value), rtol=1e-5, atol=1e-6,
                                   msg=key)
    assert grads.keys() == ref_grads.keys() and sum(float(g.abs().sum()) for g in grads.values()) > 0
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_scored_log_probs_equal_the_model_logits(tiny_model, char_tokenizer):
    """old_policy_logps and reference_logps against log_softmax of the model's own logits."""
    module = _module(tiny_model, char_tokenizer, "method=grpo", "grpo.temperature=0.7")
    rollout = _rollout([6, 3, 8, 5], [0, 1, 2, 0])
    P, C = rollout.prompt_length, rollout.completion_mask.shape[1]
    with torch.no_grad():
        logits = tiny_model(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask).logits
    want = torch.log_softmax(logits[:, P - 1 : P - 1 + C].float() / 0.7, -1).gather(
        -1, rollout.completion_ids[..., None]).squeeze(-1) * rollout.completion_mask
    old = step_lib.old_policy_logps(module.policy, rollout, module.objective, 3)
    ref = step_lib.reference_logps(tiny_model, rollout, 0.7)
    torch.testing.assert_close(old, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ref, want, rtol=1e-5, atol=1e-6)
