"""`memory` section: peak memory of one loss forward and backward at a large vocabulary."""

from __future__ import annotations

import os
import threading

import torch

from ..synthetic import VocabOnly, profiler_peak, synthetic_rollout
from .common import Settings, bench_config, bench_module, tiny_policy


class _RssPeak:
    """Peak resident set size above the level at entry, sampled every millisecond."""

    def __enter__(self):
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * self.page

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def bytes(self) -> int:
        return self.peak - self.base


def bench_memory(s: Settings) -> dict:
    # on use: a section loads training code only when it runs, so importing the bench package stays light
    from ..models import build_char_tokenizer
    from ..sources import load_source

    tok = build_char_tokenizer()
    completion = min(s.mem_completion, s.mem_tokens)
    batch = max(s.mem_tokens // completion, 1)
    prompt_len = 16
    policy = tiny_policy(s.mem_vocab, s.seed, max_positions=prompt_len + completion + 1)
    rollout = synthetic_rollout(VocabOnly(s.mem_vocab), batch, prompt_len, completion, s.seed)
    adv = torch.linspace(-1.5, 1.5, batch)
    norm = dict(num_items_in_batch=rollout.completion_mask.sum(), num_sequences=batch,
                max_completion_length=completion)
    out = {"vocab_size": s.mem_vocab, "completion_tokens": batch * completion, "batch": batch,
           "completion_length": completion, "prompt_length": prompt_len,
           "logits_bytes": batch * completion * s.mem_vocab * 4, "per_preset": {}}
    presets = [m for m in ("grpo", "oisd_logit", "oisd_attn", "oisd") if m in s.presets or m == "grpo"]
    for m in presets:
        cfg = bench_config(s, m, prompts=max(batch // s.generations, 1), max_len=completion, micro=batch)
        module = bench_module(cfg, policy, tok, load_source(cfg.task))

        def step(module=module):
            policy.zero_grad(set_to_none=True)
            terms = module.loss_terms(rollout.scored(adv), norm)
            terms["loss/total"].backward()
            del terms

        peak = profiler_peak(step)
        policy.zero_grad(set_to_none=True)
        with _RssPeak() as rss:
            step()
        policy.zero_grad(set_to_none=True)
        out["per_preset"][m] = {"peak_bytes": peak, "rss_peak_bytes": rss.bytes}
        print(f"[bench] memory {m}: {peak / 2**20:.0f} MiB (RSS {rss.bytes / 2**20:.0f} MiB)", flush=True)
    base = out["per_preset"]["grpo"]
    for v in out["per_preset"].values():
        v["ratio_vs_grpo"] = v["peak_bytes"] / base["peak_bytes"]
        v["rss_ratio_vs_grpo"] = v["rss_peak_bytes"] / max(base["rss_peak_bytes"], 1)
    return out


