"""Held-out evaluation: greedy accuracy and Avg@K (mean accuracy over K samples per problem).

Avg@K is what the paper reports; greedy accuracy is the low-noise companion. Sampling is seeded
independently of the training seed, so the same checkpoint always gets the same numbers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from .rollout import generate


def evaluate(
    model,
    tokenizer,
    prompts: Sequence[str],
    answers: Sequence[str],
    reward_fn: Callable[[str, str], float],
    k: int = 4,
    temperature: float = 1.0,
    max_new_tokens: int = 32,
    batch_size: int = 256,
    seed: int = 0,
) -> dict:
    """Greedy accuracy and Avg@K of `model` on (prompt, answer) pairs, plus per-problem detail."""
    start = time.time()
    greedy, sampled, lengths = [], [], []
    gen = torch.random.fork_rng(devices=[]) if not torch.cuda.is_available() else torch.random.fork_rng()
    with gen:
        torch.manual_seed(seed)
        for lo in range(0, len(prompts), batch_size):
            chunk_p, chunk_a = prompts[lo : lo + batch_size], answers[lo : lo + batch_size]
            g = generate(model, tokenizer, list(chunk_p), 1, max_new_tokens, do_sample=False)
            greedy += [reward_fn(t, a) for t, a in zip(g.texts, chunk_a, strict=True)]
            lengths += g.completion_mask.sum(1).tolist()
            per = max(1, batch_size // k)
            for lo2 in range(0, len(chunk_p), per):
                sp = list(chunk_p[lo2 : lo2 + per])
                s = generate(model, tokenizer, sp, k, max_new_tokens, temperature=temperature)
                for i, a in enumerate(chunk_a[lo2 : lo2 + per]):
                    sampled.append(sum(reward_fn(t, a) for t in s.texts[i * k : (i + 1) * k]) / k)
    n = len(prompts)
    return {
        "n": n,
        "k": k,
        "greedy_acc": sum(greedy) / max(n, 1),
        f"avg@{k}": sum(sampled) / max(n, 1),
        "avg_at_k": sum(sampled) / max(n, 1),
        "mean_greedy_length": sum(lengths) / max(n, 1),
        "seconds": time.time() - start,
        "per_problem_greedy": greedy,
        "per_problem_avg": sampled,
    }
