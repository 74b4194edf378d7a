"""Several updates per rollout batch, the sampler/trainer correction and BuPO's internal policy,
on a real tiny transformers model against plain re-implementations of TRL's formulas."""

from __future__ import annotations

import copy
import dataclasses
import math

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import Logger

from oisd_lab import losses
from oisd_lab.config import compose
from oisd_lab.module import OISDModule
from oisd_lab.rollout import generate
from oisd_lab.sampler import Sampler
from oisd_lab.sources import load_source

G, PROMPTS, LENGTH = 4, 4, 8


def _module(model, tok, *overrides, sampler=None):
    cfg = compose([f"grpo.prompts_per_step={PROMPTS}", f"grpo.num_generations={G}",
                   f"grpo.max_completion_length={LENGTH}", *overrides])
    source = load_source(cfg.task)
    return OISDModule(cfg, model, tok, Sampler(cfg, model, tok, source, source.reward, draw=sampler)), source


def _rollout(module, source, seed=0):
    torch.manual_seed(seed)
    problems = source.train_batch(0, PROMPTS, 0)
    return generate(module.policy, module.tokenizer, [p.prompt for p in problems], G, LENGTH)


def naive_logps(model, rollout, layer=None, final_norm=True, temperature=1.0):
    """Completion log-probs from a full forward: the final logits, or lm_head(norm?(h_layer))."""
    out = model(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask, output_hidden_states=True)
    P, C = rollout.prompt_length, rollout.completion_mask.shape[1]
    if layer is None:
        logits = out.logits
    else:
        h = out.hidden_states[layer]
        logits = model.lm_head(model.model.norm(h) if final_norm else h)
    logits = logits[:, P - 1 : P - 1 + C] / temperature
    return torch.log_softmax(logits.double(), -1).gather(-1, rollout.completion_ids[..., None]).squeeze(-1)


def _perturb(model, scale, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def _norm(rollout):
    return dict(num_items_in_batch=rollout.completion_mask.sum(), num_sequences=len(rollout),
                max_completion_length=LENGTH)


def test_old_logps_are_the_policy_before_the_update_and_the_clip_acts_as_trl(tiny_model, char_tokenizer):
    module, source = _module(tiny_model, char_tokenizer, "grpo.num_iterations=2", "grpo.micro_batch_size=4")
    rollout = _rollout(module, source)
    prepared, metrics = module._prepare(rollout)
    mask = rollout.completion_mask
    old = naive_logps(tiny_model, rollout).float()
    torch.testing.assert_close(prepared.old_logps * mask, old.detach() * mask, atol=2e-5, rtol=0)
    _perturb(tiny_model, 0.02)  # stands for the first update
    adv = torch.linspace(-1.5, 1.5, len(rollout))
    terms = module.loss_terms(prepared.scored(adv), _norm(rollout))
    # TRL's formula, written out on the new policy's log-probs
    rho = torch.exp(naive_logps(tiny_model, rollout).float() - prepared.old_logps).detach()
    a = adv[:, None]
    low, high = (rho < 0.8) & (a < 0), (rho > 1.2) & (a > 0)
    assert float((high * mask).sum()) > 0 and float((low * mask).sum()) > 0  # the case exercises both sides
    for name, flags in (("low", low), ("high", high), ("region", low | high)):
        assert float(terms[f"sum/clip_ratio/{name}_mean"]) == float((flags * mask).sum())
    torch.testing.assert_close(terms["sum/importance_ratio/mean"], (rho * mask).sum(), rtol=1e-4, atol=1e-4)
    sel = mask.bool()
    torch.testing.assert_close(terms["min/importance_ratio/min"], rho[sel].min(), rtol=1e-4, atol=0)
    torch.testing.assert_close(terms["max/importance_ratio/max"], rho[sel].max(), rtol=1e-4, atol=0)
    per_tok = -torch.min(rho * a, rho.clamp(0.8, 1.2) * a)
    torch.testing.assert_close(terms["loss/policy"].detach(), (per_tok * mask).sum() / mask.sum(), rtol=1e-4, atol=1e-6)


def test_one_iteration_needs_no_old_forward(tiny_model, char_tokenizer):
    module, source = _module(tiny_model, char_tokenizer)
    prepared, metrics = module._prepare(_rollout(module, source))
    assert prepared.old_logps is None and prepared.is_weights is None and metrics == {}


def test_truncated_completions_leave_the_loss(tiny_model, char_tokenizer):
    module, source = _module(tiny_model, char_tokenizer, "grpo.mask_truncated_completions=true")
    rollout = _rollout(module, source)
    assert 0 < int(rollout.truncated.sum()) < len(rollout)  # the case has both kinds
    prepared, _ = module._prepare(rollout)
    assert torch.equal(prepared.completion_mask.sum(1) > 0, ~rollout.truncated)
    adv = torch.linspace(-1.5, 1.5, len(rollout))
    grads = []
    for r in (prepared, rollout.take(torch.nonzero(~rollout.truncated).squeeze(1))):
        module.policy.zero_grad(set_to_none=True)
        module.accumulate(r.scored(adv[~rollout.truncated] if r is not prepared else adv), backward=torch.Tensor.backward)
        grads.append({n: p.grad.clone() for n, p in module.policy.named_parameters() if p.grad is not None})
    for name in grads[1]:  # masked rows contribute nothing: the same as dropping them
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-7, msg=name)


def _perturbed_sampler(module, source, scale):
    """Samples with the policy, but reports log-probs of a perturbed copy: a sampler that differs
    from the trainer on purpose, as vLLM's kernels do by a little."""
    other = copy.deepcopy(module.policy)
    _perturb(other, scale, seed=7)

    def sample(step, rank, world):
        problems = source.train_batch(step, PROMPTS, 0)
        rollout = generate(module.policy, module.tokenizer, [p.prompt for p in problems], G, LENGTH)
        with torch.no_grad():
            rollout.sampler_logps = naive_logps(other, rollout).float() * rollout.completion_mask
        return problems, rollout

    return sample


@pytest.mark.parametrize("mode", ["token_truncate", "sequence_mask"])
def test_sampler_mismatch_weights_the_policy_gradient(tiny_model, char_tokenizer, mode):
    module, source = _module(tiny_model, char_tokenizer, f"grpo.vllm_importance_sampling_mode={mode}",
                             "grpo.vllm_importance_sampling_clip_max=1.5")
    torch.manual_seed(0)
    _, rollout = _perturbed_sampler(module, source, 0.02)(0, 0, 1)
    prepared, metrics = module._prepare(rollout)
    mask = rollout.completion_mask
    old = naive_logps(tiny_model, rollout).float().detach()
    expected_w = losses.sampler_importance_weights(old, rollout.sampler_logps, mask, mode, None, 1.5)
    torch.testing.assert_close(prepared.is_weights, expected_w, rtol=1e-4, atol=1e-5)
    assert metrics["sampling/sampling_logp_difference/max"] > 0
    assert metrics["sampling/importance_sampling_ratio/min"] != metrics["sampling/importance_sampling_ratio/max"]
    adv = torch.linspace(-1.5, 1.5, len(rollout))
    module.policy.zero_grad(set_to_none=True)
    module.accumulate(prepared.scored(adv), backward=torch.Tensor.backward)
    got = {n: p.grad.clone() for n, p in module.policy.named_parameters()}
    module.policy.zero_grad(set_to_none=True)
    logps = naive_logps(tiny_model, rollout)
    per_tok = -(torch.exp(logps - logps.detach()) * adv[:, None].double()) * expected_w.double()
    ((per_tok * mask).sum() / mask.sum()).backward()
    for name, p in module.policy.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-3, atol=1e-6, msg=name)


def test_correction_off_leaves_the_sampler_logps_unused(tiny_model, char_tokenizer):
    module, source = _module(tiny_model, char_tokenizer, "grpo.vllm_importance_sampling_correction=false")
    _, rollout = _perturbed_sampler(module, source, 0.02)(0, 0, 1)
    prepared, metrics = module._prepare(rollout)
    assert prepared.is_weights is None and prepared.old_logps is None and metrics == {}


class _Rows(Logger):
    """Keeps every logged row in memory."""

    def __init__(self):
        super().__init__()
        self.rows = []

    name, version = "rows", 0

    def log_hyperparams(self, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.rows.append({"step": step, **metrics})


def _fit(module, steps):
    rows = _Rows()
    trainer = L.Trainer(max_steps=steps, logger=[rows], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", num_sanity_val_steps=0)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(list(range(steps)), batch_size=None))
    return rows.rows


def test_training_steps_log_the_sampler_correction(tiny_model, char_tokenizer):
    module, source = _module(tiny_model, char_tokenizer, "grpo.vllm_importance_sampling_mode=token_truncate")
    module.sampler.draw = _perturbed_sampler(module, source, 0.02)
    rows = _fit(module, 2)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["sampling/sampling_logp_difference/mean"] > 0
        assert r["sampling/importance_sampling_ratio/max"] <= 3.0
        assert r["sampling/importance_sampling_ratio/min"] < 1 < r["sampling/importance_sampling_ratio/max"]


def test_a_batch_serves_num_iterations_steps(tiny_model, char_tokenizer):
    module, source = _module(tiny_model, char_tokenizer, "grpo.num_iterations=3", "grpo.lr=0.01")
    calls = []
    plain = module.sampler.draw

    def counting(step, rank, world):
        calls.append(step)
        return plain(step, rank, world)

    module.sampler.draw = counting
    rows = _fit(module, 5)
    assert calls == [0, 1]  # batches for steps 1-3 and 4-5, indexed by batch
    assert [r["iteration"] for r in rows] == [0, 1, 2, 0, 1]
    assert rows[0]["completions/mean_length"] == rows[1]["completions/mean_length"] == rows[2]["completions/mean_length"]
    for r in rows:
        if r["iteration"] == 0:  # the old policy is the current one: ratio 1 up to rounding
            assert abs(r["importance_ratio/min"] - 1) < 1e-4 and abs(r["importance_ratio/max"] - 1) < 1e-4


def test_a_generation_batch_is_sliced_over_steps_per_generation_steps(tiny_model, char_tokenizer):
    initial = copy.deepcopy(tiny_model)
    module, source = _module(tiny_model, char_tokenizer, "grpo.steps_per_generation=2", "grpo.num_iterations=2",
                             "grpo.lr=0.01", "grpo.scale_rewards=batch")
    calls, plain = [], module.sampler.draw

    def counting(index, rank, world):
        calls.append(index)
        return plain(index, rank, world)

    module.sampler.draw = counting
    scores = iter([torch.tensor([[1.0], [0.0], [0.0], [0.0]]).repeat(PROMPTS, 1),
                   torch.tensor([[1.0], [1.0], [1.0], [0.0]]).repeat(PROMPTS, 1)])
    module.sampler.score = lambda problems, rollout: next(scores)  # rewards that differ between the slices
    rows = _fit(module, 1)
    held = module._held[1]
    assert calls == [0, 1]  # both slices sampled at step 1, by the same (initial) policy
    assert [len(b[1]) for b in held] == [PROMPTS * G] * 2
    # the old policy of BOTH slices is the policy that sampled them (a plain forward of the copy)
    for _, part, _ in held:
        want = naive_logps(initial, part).float()
        torch.testing.assert_close(part.old_logps * part.completion_mask, want * part.completion_mask,
                                   atol=2e-5, rtol=0)
    # advantages over the whole generation batch: the batch std is the std of both slices' rewards
    rewards = torch.cat([b[1].rewards for b in held])
    want_adv = losses.group_advantages(rewards, G, "batch")
    torch.testing.assert_close(torch.cat([b[1].advantages for b in held]), want_adv)
    assert not torch.allclose(held[0][1].advantages, losses.group_advantages(held[0][1].rewards, G, "batch"))  # not per slice
    assert rows[0]["generation_slice"] == 0.0 and rows[0]["iteration"] == 0.0


def test_steps_per_generation_cycles_the_slices_num_iterations_times(tiny_model, char_tokenizer):
    module, source = _module(tiny_model, char_tokenizer, "grpo.steps_per_generation=2", "grpo.num_iterations=2",
                             "grpo.lr=0.01")
    calls, plain = [], module.sampler.draw

    def counting(index, rank, world):
        calls.append(index)
        return plain(index, rank, world)

    module.sampler.draw = counting
    module.sampler.score = lambda problems, rollout: torch.tensor([[1.0], [0.0], [0.0], [1.0]]).repeat(PROMPTS, 1)
    rows = _fit(module, 5)
    assert calls == [0, 1, 2, 3]  # generation batches at steps 1 and 5
    assert [r["generation_slice"] for r in rows] == [0, 1, 0, 1, 0]
    assert [r["iteration"] for r in rows] == [0, 0, 1, 1, 0]
    assert rows[0]["completions/mean_length"] == rows[2]["completions/mean_length"]
    assert rows[1]["completions/mean_length"] == rows[3]["completions/mean_length"]
    assert abs(rows[0]["importance_ratio/max"] - 1) < 1e-4 and abs(rows[4]["importance_ratio/max"] - 1) < 1e-4
    # step 2 optimises slice 1 after step 1's update: its ratio to the sampling policy is not 1
    assert max(abs(rows[1]["importance_ratio/max"] - 1), abs(rows[1]["importance_ratio/min"] - 1)) > 1e-3


# ---------------------------------------------------------------------------- BuPO


def test_bupo_phase_covers_its_first_steps(tiny_model, char_tokenizer):
    module, _ = _module(tiny_model, char_tokenizer, "method=bupo", "max_steps=25")
    assert module.student_layers == [1]
    layers = [module.objective_at(s).policy_layer for s in range(1, 6)]
    assert layers == [1, 1, 1, None, None]  # ceil(0.1 * 25) = 3 steps
    module, _ = _module(tiny_model, char_tokenizer, "method=bupo", "method.bupo_steps=2", "method.layers=[2]")
    assert [module.objective_at(s).policy_layer for s in (1, 2, 3)] == [2, 2, None]
    module, _ = _module(tiny_model, char_tokenizer, "method=grpo")
    assert module.objective_at(1).policy_layer is None


@pytest.mark.parametrize("final_norm", [False, True])
def test_bupo_loss_is_the_lens_policy_and_trains_only_what_is_below_it(tiny_model, char_tokenizer, final_norm):
    module, source = _module(tiny_model, char_tokenizer, "method=bupo", "method.layers=[2]",
                             f"method.bupo_final_norm={str(final_norm).lower()}", "grpo.temperature=0.7",
                             "grpo.num_iterations=2")
    rollout = _rollout(module, source)
    module.objective = module.objective_at(1)
    prepared, _ = module._prepare(rollout)
    mask = rollout.completion_mask
    lens = naive_logps(tiny_model, rollout, layer=2, final_norm=final_norm, temperature=0.7).float()
    torch.testing.assert_close(prepared.old_logps * mask, lens.detach() * mask, atol=2e-5, rtol=0)
    assert float(((lens - naive_logps(tiny_model, rollout, temperature=0.7)).abs() * mask).max()) > 0.1
    adv = torch.linspace(-1.5, 1.5, len(rollout))
    module.policy.zero_grad(set_to_none=True)
    terms = module.loss_terms(prepared.scored(adv), _norm(rollout))
    terms["loss/total"].backward()
    grads = {n: p.grad for n, p in module.policy.named_parameters()}
    moved = {n for n, g in grads.items() if g is not None and float(g.abs().max()) > 0}
    # hidden_states[2] is the output of decoder layers 0 and 1: nothing above them is trained
    below = {n for n in grads if n.startswith(("model.layers.0.", "model.layers.1.", "model.embed_tokens"))}
    assert moved == below | ({"model.norm.weight"} if final_norm else set())
    module.objective = module.objective_at(10_000)  # after the phase: ordinary GRPO on the final layer
    module.policy.zero_grad(set_to_none=True)
    module.loss_terms(rollout.scored(adv), _norm(rollout))["loss/total"].backward()
    assert float(module.policy.model.layers[5].mlp.down_proj.weight.grad.abs().max()) > 0


@pytest.mark.parametrize(("overrides", "message"), [
    (["grpo.loss_type=cispo"], "grpo.epsilon_high: is 0.2; loss_type=cispo caps the ratio itself"),
    (["grpo.importance_sampling_level=group"], "grpo.importance_sampling_level: unknown value 'group'"),
    (["grpo.num_iterations=0"], "grpo.num_iterations: is 0; use >= 1"),
    (["grpo.loss_type=ppo"], "grpo.loss_type: unknown value 'ppo'"),
    (["grpo.vllm_importance_sampling_mode=token"], "grpo.vllm_importance_sampling_mode: unknown value"),
    (["method=bupo", "method.layers=[1,2]"], "method.layers: BuPO trains one internal layer; got 2"),
    (["method.bupo_steps=-1"], "method.bupo_steps: is -1.0"),
])
def test_bad_settings_name_the_field(overrides, message):
    from oisd_lab.config import ConfigError

    with pytest.raises(ConfigError) as err:
        compose(overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_vllm_layout_carries_the_sampler_logps(char_tokenizer):
    from oisd_lab.rollout_vllm import rollout_from_ids
    from oisd_lab.step import sampler_correction

    eos = char_tokenizer.eos_token_id
    a, b = char_tokenizer("ab", add_special_tokens=False)["input_ids"]
    # completion 1 reached EOS but its log-prob list lacks it (an EOS appended by the backend)
    built = rollout_from_ids([[a, b]], [[a, eos], [a, b, eos]], 2, char_tokenizer,
                             logprobs=[[-0.5, -0.1], [-1.0, -2.0]])
    # padding after the first EOS is 0; the missing EOS log-prob is NaN
    torch.testing.assert_close(built.sampler_logps, torch.tensor([[-0.5, -0.1, 0.0], [-1.0, -2.0, math.nan]]),
                               equal_nan=True)
    old = torch.tensor([[-0.5, -0.1 - 0.2, 0.0], [-1.0, -2.0, -0.3]])
    cfg = compose(["grpo.vllm_importance_sampling_mode=token_truncate"]).grpo
    weights, stats = sampler_correction(dataclasses.replace(built, old_logps=old), cfg)
    # d = old - sampler on completion tokens; the EOS without a sampler log-prob counts as d = 0
    torch.testing.assert_close(weights, torch.tensor([[1.0, math.exp(-0.2), 1.0], [1.0, 1.0, 1.0]]))
    assert stats["sampling/sampling_logp_difference/max"] == pytest.approx(0.2)
