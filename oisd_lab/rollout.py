"""Batched sampling of G completions per prompt, with a KV cache, into a `Rollout`.

Sampling is plain ancestral sampling at `temperature` (top-k off, optional top-p), so the
log-probabilities recomputed for the loss (logits / temperature) are those of the sampling
distribution, as in TRL.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import GenerationConfig


@dataclass
class Rollout:
    """One batch of completions. B = prompts x G, rows group-contiguous (prompt i -> rows iG..iG+G-1)."""

    input_ids: torch.Tensor
    """[B, P + C] left-padded prompt followed by the completion (padded after EOS)."""
    attention_mask: torch.Tensor
    """[B, P + C] 1 on real prompt tokens and on completion tokens up to and including EOS."""
    completion_mask: torch.Tensor
    """[B, C] float, 1 on completion tokens up to and including the first EOS."""
    prompt_length: int
    texts: list[str]
    """Decoded completions (special tokens removed)."""
    truncated: torch.Tensor
    """[B] bool: no EOS within max_new_tokens."""

    @property
    def completion_ids(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_length :]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, rows: slice) -> Rollout:
        """Rows of this rollout, trimmed to the longest completion among them."""
        mask = self.completion_mask[rows]
        length = int(mask.sum(1).max().item()) if mask.numel() else 0
        length = max(length, 1)
        end = self.prompt_length + length
        return Rollout(
            input_ids=self.input_ids[rows, :end],
            attention_mask=self.attention_mask[rows, :end],
            completion_mask=mask[:, :length],
            prompt_length=self.prompt_length,
            texts=self.texts[rows],
            truncated=self.truncated[rows],
        )


def completion_mask_from_ids(completion_ids: torch.Tensor, eos_token_id: int | list[int]) -> torch.Tensor:
    """[B, C] mask: 1 up to and including the first EOS token, 0 after it."""
    eos_ids = torch.as_tensor(eos_token_id, device=completion_ids.device).flatten()
    is_eos = torch.isin(completion_ids, eos_ids)
    # Number of EOS tokens strictly before each position; keep positions with none before them.
    before = torch.cumsum(is_eos.int(), dim=1) - is_eos.int()
    return (before == 0).float()


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[str],
    num_generations: int = 1,
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    top_p: float = 1.0,
    do_sample: bool = True,
) -> Rollout:
    """Sample `num_generations` completions for every prompt in one batched `generate` call."""
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    device = next(model.parameters()).device
    input_ids = enc["input_ids"].to(device).repeat_interleave(num_generations, dim=0)
    prompt_mask = enc["attention_mask"].to(device).repeat_interleave(num_generations, dim=0)
    eos = tokenizer.eos_token_id
    gen_cfg = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature if do_sample else None,
        top_p=top_p if do_sample else None,
        top_k=0 if do_sample else None,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos,
        use_cache=True,
    )
    was_training = model.training
    model.eval()
    try:
        out = model.generate(input_ids=input_ids, attention_mask=prompt_mask, generation_config=gen_cfg)
    finally:
        model.train(was_training)
    prompt_length = input_ids.shape[1]
    completion_ids = out[:, prompt_length:]
    if completion_ids.shape[1] == 0:  # nothing generated at all: keep one padded slot
        completion_ids = torch.full_like(out[:, :1], tokenizer.pad_token_id)
        out = torch.cat([out, completion_ids], dim=1)
    mask = completion_mask_from_ids(completion_ids, eos)
    eos_ids = torch.as_tensor(eos, device=device).flatten()
    truncated = ~torch.isin(completion_ids, eos_ids).any(dim=1)
    completion_ids = torch.where(mask.bool(), completion_ids, tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    return Rollout(
        input_ids=torch.cat([input_ids, completion_ids], dim=1),
        attention_mask=torch.cat([prompt_mask, mask.long()], dim=1),
        completion_mask=mask,
        prompt_length=prompt_length,
        texts=texts,
        truncated=truncated,
    )
