"""The sampler (`oisd_lab.sampler.Sampler`): the task's prompts of a batch, sampled by the policy
and scored; and the rollout that carries its rewards and advantages through the step."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from oisd_lab import losses, rewards
from oisd_lab.config import compose
from oisd_lab.module import OISDModule
from oisd_lab.rollout import Rollout, generate
from oisd_lab.sampler import Sampler
from oisd_lab.sources import load_source

G, PROMPTS, LENGTH = 4, 2, 8


def _setup(model, tok, *overrides):
    cfg = compose([f"grpo.prompts_per_step={PROMPTS}", f"grpo.num_generations={G}",
                   f"grpo.max_completion_length={LENGTH}", *overrides])
    source = load_source(cfg.task)
    return cfg, source, Sampler(cfg, model, tok, source, source.reward, format_prompt=lambda text: "> " + text)


def test_a_batch_is_this_ranks_prompts_formatted_and_sampled_by_the_policy(tiny_model, char_tokenizer):
    cfg, source, sampler = _setup(tiny_model, char_tokenizer)
    every = source.train_batch(3, PROMPTS * 2, cfg.seed)
    assert sampler.problems(3, 1, 2) == every[PROMPTS:]
    torch.manual_seed(5)
    problems, rollout = sampler(3, 1, 2)
    torch.manual_seed(5)
    want = generate(tiny_model, char_tokenizer, ["> " + p.prompt for p in every[PROMPTS:]], G, LENGTH,
                    cfg.grpo.temperature, cfg.grpo.top_p)
    assert problems == every[PROMPTS:] and torch.equal(rollout.input_ids, want.input_ids)
    assert rollout.texts == want.texts and rollout.rewards is None and rollout.advantages is None
    # a further round of dynamic sampling draws other prompts for the same batch
    assert sampler.problems(3, 1, 2, round=1) != problems


def test_score_is_the_graders_reward_of_each_completion(tiny_model, char_tokenizer):
    cfg, source, sampler = _setup(tiny_model, char_tokenizer)
    torch.manual_seed(0)
    problems, rollout = sampler(0, 0, 1)
    want = [[source.reward(text, problems[i // G].answer)] for i, text in enumerate(rollout.texts)]
    assert sampler.score(problems, rollout).tolist() == want


def test_each_reward_function_scores_a_completion_by_its_text_and_token_count(tiny_model, char_tokenizer):
    """DAPO's overlong penalty by hand from each completion's token count (L_max 8, L_cache 6:
    0 up to 2 tokens, then -1/6 per token), beside the grader and the format reward."""
    cfg, source, sampler = _setup(tiny_model, char_tokenizer, "grpo.reward_funcs=[correct,format,overlong]",
                                  "grpo.overlong_buffer=6")
    torch.manual_seed(0)
    problems, rollout = sampler(0, 0, 1)
    got = sampler.score(problems, rollout)
    lengths = [int(n) for n in rollout.completion_mask.sum(1)]
    penalty = [0.0 if n <= 2 else -1.0 if n > 8 else (2 - n) / 6 for n in lengths]
    assert any(p < 0 for p in penalty), lengths  # the penalty is read on this rollout
    assert got[:, 2].tolist() == pytest.approx(penalty, abs=1e-6)
    assert got[:, 0].tolist() == [source.reward(t, problems[i // G].answer) for i, t in enumerate(rollout.texts)]
    assert got[:, 1].tolist() == [float(rewards.format_reward(t, "")) for t in rollout.texts]


def test_a_draw_replaces_the_sampling_and_keeps_the_scoring(tiny_model, char_tokenizer):
    cfg, source, _ = _setup(tiny_model, char_tokenizer)
    fixed = (source.train_batch(0, PROMPTS, 0), "rollout")
    sampler = Sampler(cfg, tiny_model, char_tokenizer, reward=lambda text, answer: 1.0,
                      draw=lambda index, rank, world: fixed)
    assert sampler(7, 0, 1) is fixed
    assert sampler.reward_of("anything", "1") == 1.0


class _Recorded:
    def __init__(self):
        self.calls = []

    def __call__(self, view, step, problems, rollout):
        self.calls.append((problems, rollout))
        return {}


def test_the_step_rollout_carries_the_rewards_and_advantages_of_its_scores(tiny_model, char_tokenizer):
    cfg, source, sampler = _setup(tiny_model, char_tokenizer, "log.every_n_steps=1")
    drawn = []
    sampler.draw = lambda index, rank, world: drawn.append(sampler.sample(index, rank, world)) or drawn[-1]
    hook = _Recorded()
    module = OISDModule(cfg, tiny_model, char_tokenizer, sampler, on_log_step=hook)
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", num_sanity_val_steps=0)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader([0], batch_size=None))
    (problems, rollout), = hook.calls
    assert problems == drawn[0][0] and torch.equal(rollout.input_ids, drawn[0][1].input_ids)
    rewards = sampler.score(problems, drawn[0][1])[:, 0]
    assert torch.equal(rollout.rewards, rewards)
    lengths = drawn[0][1].completion_mask.sum(1)
    assert torch.equal(rollout.advantages, losses.advantages_of(rewards, lengths, G, cfg.grpo))


def test_rewards_and_advantages_travel_with_their_rows():
    mask = (torch.arange(4)[None] < torch.tensor([4, 1, 3, 2])[:, None]).float()
    rollout = Rollout(input_ids=torch.arange(4 * 6).view(4, 6), attention_mask=torch.ones(4, 6, dtype=torch.long),
                      completion_mask=mask, prompt_length=2, texts=list("abcd"),
                      truncated=torch.zeros(4, dtype=torch.bool))
    scored = rollout.scored(torch.arange(4.0), torch.arange(4.0) * 10)
    taken = scored.take(torch.tensor([2, 0]))
    assert taken.advantages.tolist() == [2.0, 0.0] and taken.rewards.tolist() == [20.0, 0.0]
    picked = scored.select([1, 3])
    assert picked.advantages.tolist() == [1.0, 3.0] and picked.rewards.tolist() == [10.0, 30.0]
    assert picked.completion_mask.shape[1] == 2  # trimmed to its longest completion; rows stay [b]
    assert scored.select(slice(0, 2)).advantages.tolist() == [0.0, 1.0]
    assert scored.without_truncated().rewards is scored.rewards
    assert scored.to("cpu") is scored
    assert rollout.advantages is None and rollout.rewards is None
