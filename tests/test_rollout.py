"""Rollouts: masks up to and including EOS, group layout, trimming."""

from __future__ import annotations

import torch

from oisd_lab.rollout import completion_mask_from_ids, generate


def test_completion_mask_stops_after_first_eos():
    ids = torch.tensor([[5, 6, 2, 7, 2], [2, 9, 9, 9, 9], [5, 5, 5, 5, 5]])
    mask = completion_mask_from_ids(ids, eos_token_id=2)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]


def test_generate_groups_and_masks(tiny_model, char_tokenizer):
    torch.manual_seed(0)
    prompts = ["Q: 1+2\nA: ", "Q: (3+4)*5\nA: "]
    r = generate(tiny_model, char_tokenizer, prompts, num_generations=3, max_new_tokens=6)
    assert len(r) == 6 and r.completion_mask.shape == (6, r.input_ids.shape[1] - r.prompt_length)
    # rows of a group share the prompt; prompts are left-padded
    assert torch.equal(r.input_ids[0, : r.prompt_length], r.input_ids[2, : r.prompt_length])
    assert r.attention_mask[0, 0] == 0 and r.attention_mask[3, 0] == 1
    # masked completion slots hold padding; the attention mask covers exactly prompt + completion
    pad = char_tokenizer.pad_token_id
    assert bool((r.completion_ids[r.completion_mask == 0] == pad).all())
    assert torch.equal(r.attention_mask[:, r.prompt_length :].float(), r.completion_mask)
    assert r.texts[0] == char_tokenizer.decode(r.completion_ids[0], skip_special_tokens=True)
    part = r.select(slice(2, 4))
    assert len(part) == 2 and part.completion_mask.shape[1] == int(r.completion_mask[2:4].sum(1).max())


def test_greedy_generation_is_deterministic(tiny_model, char_tokenizer):
    a = generate(tiny_model, char_tokenizer, ["Q: 2+2\nA: "], 2, 8, do_sample=False)
    b = generate(tiny_model, char_tokenizer, ["Q: 2+2\nA: "], 2, 8, do_sample=False)
    assert a.texts == b.texts and a.texts[0] == a.texts[1]
