"""`attn512` section: the attention alignment's cost at long completions."""

from __future__ import annotations

import copy

import torch

from ..synthetic import synthetic_rollout
from .common import (
    NoEos,
    Settings,
    bench_config,
    bench_module,
    clock_now,
    fit_steps,
    median_of,
    median_ratio,
    per_round,
    rotated,
    stats,
    tiny_policy,
)


def bench_attn(s: Settings) -> dict:
    # on use: a section loads training code only when it runs, so importing the bench package stays light
    from ..models import build_char_tokenizer
    from ..rollout import generate
    from ..sources import load_source

    tok = build_char_tokenizer()
    policy = tiny_policy(len(tok), s.seed, max_positions=s.attn_len + 64)
    init = copy.deepcopy(policy.state_dict())
    presets = [m for m in ("grpo", "oisd_attn", "oisd") if m in s.presets]
    cfgs = {m: bench_config(s, m, prompts=s.attn_prompts, max_len=s.attn_len, micro=s.attn_micro) for m in presets}
    source = load_source(cfgs["grpo"].task)
    problems = source.train_batch(0, s.attn_prompts, s.seed)
    batch = s.attn_prompts * s.generations
    rollout = synthetic_rollout(tok, batch, 16, s.attn_len, s.seed)
    fixed = (problems, rollout)
    fits: dict[str, list[list[dict]]] = {m: [] for m in presets}
    gen_s = []
    for r in range(s.repeats):
        torch.manual_seed(s.seed + r)
        w0, c0 = clock_now()
        generate(policy, NoEos(tok), [p.prompt for p in problems], s.generations, s.attn_len)
        w1, c1 = clock_now()
        gen_s.append({"wall": w1 - w0, "cpu": c1 - c0})
        for m in rotated(tuple(presets), r):
            policy.load_state_dict(init)
            fits[m].append(fit_steps(bench_module(cfgs[m], policy, tok, source, fixed), s.steps + 1)[1:])
    policy.load_state_dict(init)
    out = {"completion_length": s.attn_len, "batch": batch, "micro_batch_size": s.attn_micro,
           "generate_s": {c: stats([x[c] for x in gen_s]) for c in ("cpu", "wall")}, "per_preset": {}}
    for m in presets:
        out["per_preset"][m] = {}
        for c in ("cpu", "wall"):
            gen = out["generate_s"][c]["median"]
            out["per_preset"][m][c] = {
                "opt_step_s": stats([median_of(a, c) for a in fits[m]]),
                "ratio_opt_vs_grpo": per_round(fits[m], fits["grpo"], median_ratio(c)),
                "ratio_full_vs_grpo": per_round(fits[m], fits["grpo"], lambda a, b, c=c, gen=gen:
                                                 (gen + median_of(a, c)) / (gen + median_of(b, c))),
            }
    return out
