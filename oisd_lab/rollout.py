"""Batched sampling of G completions per prompt, with a KV cache, into a `Rollout`.

Sampling is plain ancestral sampling at `temperature` (top-k off, optional top-p), so the
log-probabilities recomputed for the loss (logits / temperature) are those of the sampling
distribution, as in TRL. The decoding loop is our own rather than `model.generate`: each prompt
is prefilled once and its KV cache shared by its G completions, rows that reached EOS leave the
batch, and no generation defaults stored with a checkpoint (repetition penalty, top-k, ...) can
change the sampling distribution behind the loss's back.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass

import torch
from transformers import DynamicCache


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
    sampler_logps: torch.Tensor | None = None
    """[B, C] the sampler's own log-probs of the completion tokens, when the sampler is not the
    trainer's forward (vLLM); None for `generate`, whose sampler is the policy itself."""
    old_logps: torch.Tensor | None = None
    """[B, C] the trainer's log-probs before the rollout's first update (the old policy), when
    set by the trainer; None means the current policy's, detached."""
    is_weights: torch.Tensor | None = None
    """[B, C] or [B, 1] sampler-mismatch importance weights of the policy loss, or None."""
    rewards: torch.Tensor | None = None
    """[B] each completion's reward (`grpo.reward_funcs` weighted by `grpo.reward_weights`), once
    scored; None before."""
    advantages: torch.Tensor | None = None
    """[B] each completion's advantage (`grpo.advantage_estimator`), once computed; None before."""

    @property
    def completion_ids(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_length :]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def scored(self, advantages: torch.Tensor, rewards: torch.Tensor | None = None) -> Rollout:
        """This rollout with its rows' advantages [B] and rewards [B] (None: none)."""
        return dataclasses.replace(self, advantages=advantages, rewards=rewards)

    def _extras(self, fn, per_row=None) -> dict:
        """The optional tensors: the per-token ones passed through `fn`, the per-row ones (rewards,
        advantages) through `per_row` (default `fn`); None stays None."""
        per_row = per_row or fn
        tokens = {name: None if t is None else fn(t)
                  for name, t in (("sampler_logps", self.sampler_logps), ("old_logps", self.old_logps),
                                  ("is_weights", self.is_weights))}
        rows = {name: None if t is None else per_row(t)
                for name, t in (("rewards", self.rewards), ("advantages", self.advantages))}
        return tokens | rows

    def take(self, index: torch.Tensor) -> Rollout:
        """The rows in `index` order ([n] long); the result is no longer group-contiguous."""
        rows = index.tolist()
        on = self.input_ids.device
        return Rollout(
            input_ids=self.input_ids[index.to(on)],
            attention_mask=self.attention_mask[index.to(on)],
            completion_mask=self.completion_mask[index.to(self.completion_mask.device)],
            prompt_length=self.prompt_length,
            texts=[self.texts[i] for i in rows],
            truncated=self.truncated[index.to(self.truncated.device)],
            **self._extras(lambda t: t[index.to(t.device)]),
        )

    def to(self, device) -> Rollout:
        """This rollout with its tensors on `device` (itself when they are there already)."""
        if all(t is None or t.device == torch.device(device)
               for t in (self.input_ids, self.rewards, self.advantages)):
            return self
        return Rollout(self.input_ids.to(device), self.attention_mask.to(device), self.completion_mask.to(device),
                       self.prompt_length, self.texts, self.truncated.to(device),
                       **self._extras(lambda t: t.to(device)))

    @staticmethod
    def concat(parts: list[Rollout], pad_id: int = 0) -> Rollout:
        """The rows of `parts` in order, as one rollout: prompts left-padded to the longest prompt,
        completions right-padded to the longest completion (padding masked out; the sampler's
        log-probs padded with NaN, i.e. "none"). Rotary position encodings see only relative
        positions, so the extra left padding does not change what the model computes for a row
        (to float rounding)."""
        P = max(p.prompt_length for p in parts)
        C = max(p.completion_mask.shape[1] for p in parts)
        pieces: dict[str, list] = {k: [] for k in ("input_ids", "attention_mask", "completion_mask", "sampler_logps")}
        for p in parts:
            left, right = P - p.prompt_length, C - p.completion_mask.shape[1]
            pad = torch.nn.functional.pad
            pieces["input_ids"].append(pad(p.input_ids, (left, right), value=pad_id))
            pieces["attention_mask"].append(pad(p.attention_mask, (left, right), value=0))
            pieces["completion_mask"].append(pad(p.completion_mask, (0, right), value=0.0))
            if p.sampler_logps is not None:
                pieces["sampler_logps"].append(pad(p.sampler_logps, (0, right), value=float("nan")))
        if any(t is not None for p in parts for t in (p.old_logps, p.is_weights, p.rewards, p.advantages)):
            raise ValueError("concatenate rollouts before their old log-probs, weights, rewards and "
                             "advantages are set")
        sampler = pieces["sampler_logps"]
        if sampler and len(sampler) != len(parts):
            raise ValueError("either every part or none has sampler log-probs")
        return Rollout(torch.cat(pieces["input_ids"]), torch.cat(pieces["attention_mask"]),
                       torch.cat(pieces["completion_mask"]), P, [t for p in parts for t in p.texts],
                       torch.cat([p.truncated for p in parts]), sampler_logps=torch.cat(sampler) if sampler else None)

    def select(self, rows: slice | list[int]) -> Rollout:
        """Rows of this rollout (a slice, or a list of row indices), trimmed to the longest
        completion among them."""
        mask = self.completion_mask[rows]
        length = int(mask.sum(1).max().item()) if mask.numel() else 0
        length = max(length, 1)
        end = self.prompt_length + length
        return Rollout(
            input_ids=self.input_ids[rows, :end],
            attention_mask=self.attention_mask[rows, :end],
            completion_mask=mask[:, :length],
            prompt_length=self.prompt_length,
            texts=self.texts[rows] if isinstance(rows, slice) else [self.texts[i] for i in rows],
            truncated=self.truncated[rows],
            **self._extras(lambda t: t[rows, :length], lambda t: t[rows]),
        )

    def without_truncated(self) -> Rollout:
        """This rollout with truncated completions' mask zeroed: they leave the loss (TRL
        `mask_truncated_completions`); their tokens stay in place."""
        keep = (~self.truncated).to(self.completion_mask)[:, None]
        return dataclasses.replace(self, completion_mask=self.completion_mask * keep)


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
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
) -> Rollout:
    """Sample `num_generations` completions for every prompt in one batched decoding loop.
    top_k (0: off), min_p (0: off) and repetition_penalty (1: off) shape sampling as transformers'
    processors of those names do; the loss's log-probs stay over the whole vocabulary at the
    temperature, as TRL's."""
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    device = next(model.parameters()).device
    prompt_ids, prompt_mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    eos_ids = torch.as_tensor(tokenizer.eos_token_id, device=device).flatten()
    was_training = model.training
    model.eval()
    try:
        completion_ids = decode_completions(model, prompt_ids, prompt_mask, num_generations, max_new_tokens, temperature,
                                 top_p, do_sample, eos_ids, tokenizer.pad_token_id,
                                 dict(top_k=top_k, min_p=min_p, repetition_penalty=repetition_penalty))
    finally:
        model.train(was_training)
    input_ids = prompt_ids.repeat_interleave(num_generations, dim=0)
    prompt_mask = prompt_mask.repeat_interleave(num_generations, dim=0)
    prompt_length = input_ids.shape[1]
    if completion_ids.shape[1] == 0:  # nothing generated at all: keep one padded slot
        completion_ids = torch.full_like(input_ids[:, :1], tokenizer.pad_token_id)
    mask = completion_mask_from_ids(completion_ids, eos_ids)
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


def _next_tokens(logits: torch.Tensor, temperature: float, top_p: float, do_sample: bool, top_k: int = 0,
                 min_p: float = 0.0, repetition_penalty: float = 1.0, seen: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """[n, V] float32 logits -> [n] token ids, in transformers' order: the repetition penalty on
    the ids in `seen` [n, S] (prompt and completion so far), then temperature, top-k, top-p and
    min-p (transformers' own processors for the penalty, top-k and min-p)."""
    if repetition_penalty != 1.0 and seen is not None:
        from transformers import RepetitionPenaltyLogitsProcessor

        logits = RepetitionPenaltyLogitsProcessor(repetition_penalty)(seen, logits)
    if not do_sample:
        return logits.argmax(-1)
    if temperature != 1.0:
        logits = logits / temperature
    if top_k > 0:
        from transformers import TopKLogitsWarper

        logits = TopKLogitsWarper(top_k)(None, logits)
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        drop = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[..., -1:] = False  # keep at least the most likely token
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    if min_p > 0.0:
        from transformers import MinPLogitsWarper

        logits = MinPLogitsWarper(min_p)(None, logits)
    return torch.multinomial(logits.softmax(-1), num_samples=1).squeeze(1)


@torch.no_grad()
def decode_completions(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, num_generations: int,
            max_new_tokens: int, temperature: float, top_p: float, do_sample: bool,
            eos_ids: torch.Tensor, pad_id: int, shaping: dict | None = None) -> torch.Tensor:
    """Completion ids [prompts * G, <= max_new_tokens], pad after EOS, rows group-contiguous.

    Prompts [p, P] (left-padded) are prefilled once; the cache is then repeated G times, so the
    group shares the prompt's work. Finished rows are dropped from the batch (and the cache), and
    the loop stops when every row has finished. Positions count real tokens only, as in
    `model.generate` for left padding. One host sync per token (the early-stop test), as there.
    """
    rows = prompt_ids.shape[0] * num_generations
    out = torch.full((rows, max(max_new_tokens, 0)), pad_id, dtype=torch.long, device=prompt_ids.device)
    if max_new_tokens <= 0 or rows == 0:
        return out
    positions = (prompt_mask.long().cumsum(-1) - 1).clamp(min=0)
    # transformers renamed `past_key_values` to `cache` (5.2x); pass whichever forward takes
    kv = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    cache = DynamicCache(config=model.config)
    step = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions,
                 use_cache=True, logits_to_keep=1, **{kv: cache})
    cache.batch_repeat_interleave(num_generations)
    logits = step.logits[:, -1].float().repeat_interleave(num_generations, dim=0)
    mask = prompt_mask.repeat_interleave(num_generations, dim=0)
    pos = positions[:, -1:].repeat_interleave(num_generations, dim=0)
    active = torch.arange(rows, device=prompt_ids.device)  # output row of each batch row
    shaping = shaping or {}
    penalised = shaping.get("repetition_penalty", 1.0) != 1.0
    prompts = prompt_ids.repeat_interleave(num_generations, dim=0) if penalised else None
    for t in range(max_new_tokens):
        seen = torch.cat([prompts[active], out[active, :t]], dim=1) if penalised else None
        tokens = _next_tokens(logits, temperature, top_p, do_sample, seen=seen, **shaping)
        out[active, t] = tokens
        if t == max_new_tokens - 1:
            break
        running = ~torch.isin(tokens, eos_ids)
        if not bool(running.all()):
            if not bool(running.any()):
                break
            keep = running.nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            active, mask, pos, tokens = active[keep], mask[keep], pos[keep], tokens[keep]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        pos = pos + 1
        step = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=pos,
                     use_cache=True, **{kv: cache})
        logits = step.logits[:, -1].float()
    return out[:, : t + 1]
