"""The shared prompt once (`grpo.shared_prompt`) against the whole-row forward: the policy's
outputs, and the whole step's loss terms and gradients, under left padding, groups of unequal
completion lengths cut across micro-batches, the KL reference, `num_iterations`, BuPO, the
attention channel and gradient checkpointing; and that the prompt's positions run once."""

from __future__ import annotations

import copy

import pytest
import torch
from test_alignment_options import _rollout
from test_head import _grads
from transformers import AutoModelForCausalLM, Gemma3TextConfig

from oisd_lab import shared_prompt
from oisd_lab import step as step_lib
from oisd_lab.anatomy import decoder_layers
from oisd_lab.config import compose
from oisd_lab.models import build_tiny_model
from oisd_lab.module import OISDModule
from oisd_lab.rollout import Rollout
from oisd_lab.run.trainer import enable_checkpointing
from oisd_lab.sampler import Sampler
from oisd_lab.sources import load_source

LENGTHS = [6, 3, 8, 5, 2, 7, 8, 4] * 2  # completion tokens of 16 rows: four groups of 4
PADS = [0, 0, 0, 0, 2, 2, 2, 2, 1, 1, 1, 1, 3, 3, 3, 3]  # each group's prompt has its own padding
ADV = torch.tensor([1.5, -0.5, -0.5, -0.5, 0.0, 0.3, 0.0, -0.3, 0.9, 0.9, -0.9, -0.9, 1.2, -1.2, 0.3, -0.3])


def grouped_rollout(G: int = 4) -> Rollout:
    """`_rollout`'s layout (prompts of 5 tokens, left-padded; completions of LENGTHS) with each
    group of G rows sharing its first row's prompt."""
    rollout = _rollout(LENGTHS, PADS)
    P = rollout.prompt_length
    for row in range(len(LENGTHS)):
        rollout.input_ids[row, :P] = rollout.input_ids[row - row % G, :P]
    return rollout


def _positions_run(model) -> list[int]:
    """A hook's record of the positions (rows x length) each forward runs through the first layer."""
    seen: list[int] = []
    decoder_layers(model)[0].register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(int((args[0] if args else kwargs["hidden_states"]).shape[:2].numel())),
        with_kwargs=True)
    return seen


def test_groups_of_finds_the_rows_that_share_ids_and_padding():
    ids = torch.tensor([[0, 5, 6], [0, 5, 6], [7, 5, 6], [0, 5, 6]])
    mask = torch.tensor([[0, 1, 1], [0, 1, 1], [1, 1, 1], [1, 1, 1]])  # row 3: the same ids, unpadded
    first, inverse = shared_prompt.groups_of(ids, mask, 3)
    assert sorted(first.tolist()) == [0, 2, 3]
    assert [first[i].item() for i in inverse] == [0, 0, 2, 3]
    assert shared_prompt.groups_of(ids[1:], mask[1:], 3) is None  # nothing repeats
    assert shared_prompt.groups_of(ids, mask, 0) is None  # a one-token prompt: no prefix


@pytest.mark.parametrize("preset", ["tiny", "tiny_llama"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_policy_outputs_and_their_gradients_equal_the_whole_rows(char_tokenizer, preset, checkpointing):
    model = build_tiny_model(preset, vocab_size=len(char_tokenizer), seed=0).train()
    if checkpointing:
        enable_checkpointing(model)  # as `oisd-lab train` does
    part = grouped_rollout()
    L = model.config.num_hidden_layers
    P, C = part.prompt_length, part.completion_mask.shape[1]
    results, runs = {}, _positions_run(model)
    for shared in (False, True):
        model.zero_grad(set_to_none=True)
        runs.clear()
        out = step_lib.policy_forward(model, part, hidden_layers=[0, 2], attn_layers=[2, L], shared_prompt=shared)
        forwards = list(runs)  # (a checkpointed layer's replay in backward may run the hook again)
        rows = out.attention_rows(2, keys=P - 1 + C)
        weights = torch.linspace(-1.0, 2.0, C)[None, :, None]
        loss = (out.final * weights).sum() + (out.hidden[2] ** 2 * weights).sum() + (out.hidden[0] * weights).sum() \
            + 10 * (rows.mean(1) * torch.linspace(0, 1, P - 1 + C)).sum()
        loss.backward()
        results[shared] = ([out.final, out.hidden[0], out.hidden[2], rows],
                           {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        assert forwards == ([len(part) * (P + C)] if not shared else [4 * (P - 1), len(part) * C])
    (plain, plain_grads), (ours, ours_grads) = results[False], results[True]
    for got, want in zip(ours, plain, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert ours_grads.keys() == plain_grads.keys()
    assert {n for n, _ in model.named_parameters()} - plain_grads.keys() <= {"lm_head.weight"}  # the loss reads no logits
    for name, want in plain_grads.items():
        scale = float(want.abs().max())
        assert scale > 0, name
        torch.testing.assert_close(ours_grads[name], want, rtol=1e-4, atol=1e-5 * scale, msg=name)


@pytest.mark.parametrize("overrides", [
    ("method=oisd", "grpo.beta=0.04"),
    ("method=oisd", "grpo.num_iterations=2", "grpo.temperature=0.8", "method.attn_weight=10"),
    ("method=grpo", "grpo.loss_type=grpo"),
    ("method=bupo",),
    ("method=oisd", "method.bupo_steps=0.5", "grpo.beta=0.04"),
])
@pytest.mark.parametrize("micro", [3, 8])
def test_training_step_equals_the_whole_rows(tiny_model, char_tokenizer, overrides, micro):
    """Micro-batches of 3 rows cut the groups (a prompt shared by 1-3 rows of a micro-batch); of 8,
    two whole groups. Loss terms and every parameter's gradient as with whole rows."""
    cfg = compose(["grpo.prompts_per_step=4", "grpo.num_generations=4", "grpo.max_completion_length=8", *overrides])
    source = load_source(cfg.task)
    ref = copy.deepcopy(tiny_model)
    with torch.no_grad():  # a reference that differs from the policy, so the KL is not 0
        for p in ref.parameters():
            p.add_(1e-2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(4)))
    module = OISDModule(cfg, tiny_model, char_tokenizer, Sampler(cfg, tiny_model, char_tokenizer, source, source.reward),
                        ref_model=ref)
    module.objective = module.objective_at(1)
    rollout = grouped_rollout()
    results = {}
    for shared in (False, True):
        module.cfg.grpo.shared_prompt = shared
        module.objective = module.objective_at(1)
        if module.cfg.grpo.num_iterations > 1:
            rollout.old_logps = step_lib.old_policy_logps(module.policy, rollout, module.objective, micro)
        results[shared] = _grads(module, rollout, ADV, micro), rollout.old_logps
    ((sums, grads), old), ((want_sums, want_grads), want_old) = results[True], results[False]
    if want_old is not None:
        torch.testing.assert_close(old, want_old, rtol=1e-5, atol=1e-6)
    assert sums.keys() == want_sums.keys()
    for key, value in want_sums.items():
        torch.testing.assert_close(torch.as_tensor(sums[key]), torch.as_tensor(value), rtol=1e-5, atol=1e-6, msg=key)
    assert grads.keys() == want_grads.keys() and sum(float(g.abs().sum()) for g in grads.values()) > 0
    for name, want in want_grads.items():
        torch.testing.assert_close(grads[name], want, rtol=1e-4, atol=1e-6, msg=name)


def test_sliding_window_models_run_whole_rows(char_tokenizer):
    """A model with sliding-window layers is left to the whole-row forward (same outputs, and the
    first layer sees every row's prompt)."""
    config = Gemma3TextConfig(vocab_size=len(char_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4,
                              query_pre_attn_scalar=8, layer_types=["sliding_attention", "full_attention"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    assert not shared_prompt.applies(model)
    assert shared_prompt.applies(build_tiny_model("tiny", vocab_size=len(char_tokenizer), seed=0))
    part = grouped_rollout()
    runs = _positions_run(model)
    with torch.no_grad():
        got = step_lib.policy_forward(model, part, shared_prompt=True).final
        want = step_lib.policy_forward(model, part, shared_prompt=False).final
    assert torch.equal(got, want) and runs[0] == runs[1] == part.input_ids.numel()


def _forward_grads(model, part, shared, autocast=False):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = step_lib.policy_forward(model, part, hidden_layers=[2], shared_prompt=shared)
        loss = (out.final.float() ** 2 * torch.linspace(-1, 1, out.final.shape[1])[None, :, None]).sum() \
            + out.hidden[2].float().sum()
    loss.backward()
    return out.final.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_under_bf16_autocast_the_error_against_float32_is_the_whole_rows_own(char_tokenizer):
    """bf16 compute rounds differently in the two forwards' matmuls: both are compared with the
    float32 whole-row result, and the shared prompt's error is of the whole rows' size."""
    model = build_tiny_model("tiny", vocab_size=len(char_tokenizer), seed=0)
    part = grouped_rollout()
    exact, exact_grads = _forward_grads(model, part, shared=False)
    errors = {}
    for shared in (False, True):
        final, grads = _forward_grads(model, part, shared, autocast=True)
        final = final.float()
        assert grads.keys() == exact_grads.keys()
        errors[shared] = (float((final - exact).norm() / exact.norm()),
                          max(float((grads[n] - g).norm() / g.norm()) for n, g in exact_grads.items()))
    assert 0 < errors[False][1] < 0.1
    for whole, ours in zip(errors[False], errors[True], strict=True):
        assert ours <= 1.5 * whole + 1e-3, errors


def test_a_peft_wrapped_policy_shares_its_prompts_too(char_tokenizer):
    """In float64 (the RMS norms still compute in float32), so that the two forwards' different
    summation orders leave little to tolerate."""
    from oisd_lab import lora

    model = lora.attach(build_tiny_model("tiny", vocab_size=len(char_tokenizer), seed=0).double(), 4, 8.0, 0.0,
                        ["q_proj", "v_proj"])
    with torch.no_grad():  # adapters that act: peft starts B at zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    part = grouped_rollout()
    runs = _positions_run(model)
    (want, want_grads), (got, grads) = (_forward_grads(model, part, shared) for shared in (False, True))
    assert runs[1] == 4 * (part.prompt_length - 1)  # the prefix ran once per group
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert grads.keys() == want_grads.keys() and all("lora_" in n for n in grads) and len(grads) == 24
    for name, g in want_grads.items():
        assert float(g.abs().max()) > 0, name
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-7 * float(g.abs().max()), msg=name)


def test_an_fsdp_sharded_model_runs_whole_rows(char_tokenizer, tmp_path):
    """FSDP2 gathers a layer's weights for its backward on the path of the layer's outputs, which
    the prefix's keys and values bypass: a sharded model is left to the whole-row forward."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    model = build_tiny_model("tiny", vocab_size=len(char_tokenizer), seed=0)
    assert shared_prompt.applies(model)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        for layer in decoder_layers(model):
            fully_shard(layer)
        fully_shard(model)
        assert not shared_prompt.applies(model)
    finally:
        dist.destroy_process_group()
