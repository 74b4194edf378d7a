"""DAPO's dynamic sampling (`grpo.dynamic_sampling`): rollouts concatenate exactly (the model's
log-probs of a row do not depend on the extra padding), an optimizer step gets no zero-advantage
group unless the cap on sampling rounds is hit (which is logged), and training runs with it."""

from __future__ import annotations

import json
import zlib

import pytest
import torch
from conftest import assert_alignment_in_view, assert_gradients_flowed, tiny_overrides

from oisd_lab.cli import main
from oisd_lab.models import build_char_tokenizer, build_tiny_model
from oisd_lab.rollout import Rollout, generate
from oisd_lab.sources import TaskSource


def _logps(model, r: Rollout) -> torch.Tensor:
    P, C = r.prompt_length, r.completion_mask.shape[1]
    with torch.no_grad():
        logits = model(input_ids=r.input_ids, attention_mask=r.attention_mask).logits[:, P - 1 : P - 1 + C]
    return torch.log_softmax(logits.double(), -1).gather(-1, r.completion_ids[..., None]).squeeze(-1) * r.completion_mask


def test_concatenated_rollouts_keep_every_rows_log_probs():
    tok = build_char_tokenizer()
    model = build_tiny_model("tiny", vocab_size=len(tok), seed=0).eval()
    torch.manual_seed(0)
    a = generate(model, tok, ["Q: 1+2\nA: ", "Q: 3\nA: "], 2, max_new_tokens=5, temperature=1.5)
    b = generate(model, tok, ["Q: 10*30-45+6\nA: "], 2, max_new_tokens=9, temperature=1.5)
    both = Rollout.concat([a, b], pad_id=tok.pad_token_id)
    assert both.prompt_length == max(a.prompt_length, b.prompt_length) and len(both) == 6
    assert both.completion_mask.shape[1] == max(a.completion_mask.shape[1], b.completion_mask.shape[1])
    assert both.texts == a.texts + b.texts
    whole = _logps(model, both)
    for part, rows in ((a, slice(0, 4)), (b, slice(4, 6))):
        alone = _logps(model, part)
        C = alone.shape[1]
        torch.testing.assert_close(whole[rows, :C], alone, rtol=1e-4, atol=1e-5)
        assert torch.equal(both.completion_ids[rows, :C] * part.completion_mask.long(),
                           part.completion_ids * part.completion_mask.long())


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_no_zero_advantage_group_unless_the_cap_is_hit(tmp_path, cache_dir, monkeypatch):
    # a reward that is constant for half of the prompts (by a checksum of the answer) and varies
    # with the text for the rest: round 1 keeps about half the groups, further rounds fill the batch
    def reward(self, text, answer):
        if zlib.crc32(answer.encode()) % 2:
            return 1.0
        return float(zlib.crc32(text.encode()) % 2)

    monkeypatch.setattr(TaskSource, "reward", reward)
    run_dir = tmp_path / "run"
    assert main(["train", *tiny_overrides(run_dir, "log.wandb_mode=disabled", "max_steps=3", "method=oisd",
                                          "grpo.dynamic_sampling=true", "grpo.dynamic_sampling_max_rounds=6")]) == 0
    rows = _rows(run_dir)
    assert_gradients_flowed(rows)
    assert_alignment_in_view(rows)
    for r in rows:
        assert r["dynamic_sampling/rounds"] >= 2 and r["dynamic_sampling/groups_dropped"] >= 1
        assert r["dynamic_sampling/rollouts_sampled"] >= 16 * r["dynamic_sampling/rounds"] - 1e-9
        if r["dynamic_sampling/cap_hit"] == 0:
            assert r["frac_reward_zero_std"] == 0.0
    assert any(r["dynamic_sampling/cap_hit"] == 0 for r in rows)


@pytest.mark.slow
def test_the_cap_is_logged_when_no_group_is_informative(tmp_path, cache_dir, monkeypatch):
    monkeypatch.setattr(TaskSource, "reward", lambda self, text, answer: 0.0)
    run_dir = tmp_path / "run"
    assert main(["train", *tiny_overrides(run_dir, "log.wandb_mode=disabled", "max_steps=1",
                                          "grpo.dynamic_sampling=true", "grpo.dynamic_sampling_max_rounds=3")]) == 0
    (row,) = _rows(run_dir)
    assert row["dynamic_sampling/cap_hit"] == 1.0 and row["dynamic_sampling/rounds"] == 3.0
    assert row["dynamic_sampling/rollouts_sampled"] == 48.0 and row["frac_reward_zero_std"] == 1.0
