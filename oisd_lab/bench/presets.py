"""`presets` section: every method preset's step time against `grpo`, side by side in rounds."""

from __future__ import annotations

import copy
import statistics
import tempfile
from pathlib import Path

import torch

from .common import (
    Settings,
    bench_config,
    bench_module,
    fit_steps,
    median_of,
    median_ratio,
    per_round,
    rotated,
    start_policy,
    stats,
)


def bench_presets(s: Settings) -> dict:
    # on use: a section loads training code only when it runs, so importing the bench package stays light
    from ..rollout import generate
    from ..run.folder import RunDir
    from ..run_hooks import LogStepHook
    from ..sources import load_source

    policy, tok = start_policy(s)
    init = copy.deepcopy(policy.state_dict())
    cfgs = {m: bench_config(s, m) for m in s.presets}
    source = load_source(cfgs["grpo"].task)
    problems = source.train_batch(0, s.prompts, s.seed)
    torch.manual_seed(s.seed)
    fixed = (problems, generate(policy, tok, [p.prompt for p in problems], s.generations, s.max_len))
    opt: dict[str, list[list[dict]]] = {m: [] for m in s.presets}
    full: dict[str, list[list[dict]]] = {m: [] for m in s.presets}
    fit_steps(bench_module(cfgs["grpo"], policy, tok, source, fixed), 2)  # process warm-up
    with tempfile.TemporaryDirectory(prefix="oisd_bench_") as tmp:  # diagnostics files
        for r in range(s.repeats):
            for m in rotated(s.presets, r):
                policy.load_state_dict(init)
                opt[m].append(fit_steps(bench_module(cfgs[m], policy, tok, source, fixed), s.steps + 1))
                policy.load_state_dict(init)
                run_dir = Path(tmp) / f"{m}-{r}"
                run_dir.mkdir()
                hook = LogStepHook(cfgs[m], RunDir(run_dir))
                full[m].append(fit_steps(bench_module(cfgs[m], policy, tok, source, hook=hook), s.steps + 1))
    policy.load_state_dict(init)
    return {"batch": {"prompts": s.prompts, "generations": s.generations, "max_completion_length": s.max_len,
                      "micro_batch_size": s.micro, "fixed_rollout_completion_tokens":
                      float(fixed[1].completion_mask.sum())},
            "log_every_n_steps": cfgs["grpo"].log.every_n_steps,
            "per_preset": {m: _preset_summary(m, opt, full, s, cfgs[m].log.every_n_steps) for m in s.presets}}


def _preset_summary(m: str, opt: dict, full: dict, s: Settings, every: int) -> dict:
    timed = lambda fits: [f[1:] for f in fits]  # noqa: E731  drop each fit's warm-up step
    o, g = timed(opt[m]), timed(opt["grpo"])
    f, fg = timed(full[m]), timed(full["grpo"])
    batch = s.prompts * s.generations
    out: dict = {"mean_completion_length": stats([median_of(x, "completions/mean_length") for x in f])}
    for c in ("cpu", "wall"):
        diag = stats([x[0][f"diagnostics_{c}"] for x in full[m] if f"diagnostics_{c}" in x[0]])
        align = per_round(o, g, lambda a, b, c=c: median_of(a, f"optimise_{c}") - median_of(b, f"optimise_{c}"))
        rest = lambda x, c=c: (median_of(x, c) - median_of(x, f"rollout_{c}")  # noqa: E731
                               - median_of(x, f"optimise_{c}") - median_of(x, "time/scoring"))
        out[c] = {
            "opt_step_s": stats([median_of(x, c) for x in o]),
            "full_step_s": stats([median_of(x, c) for x in f]),
            "ratio_opt_vs_grpo": per_round(o, g, median_ratio(c)),
            "ratio_full_vs_grpo": per_round(f, fg, median_ratio(c)),
            "rollout_tokens_per_s": stats([statistics.median(r["completions/mean_length"] * batch / r[f"rollout_{c}"]
                                                             for r in x) for x in f]),
            "diagnostics_per_log_step_s": diag,
            "breakdown_s": {
                "rollout": stats([median_of(x, f"rollout_{c}") for x in f]),
                "scoring": stats([median_of(x, "time/scoring") for x in f]),
                "forward_backward": stats([median_of(x, f"optimise_{c}") for x in f]),
                "alignment": align,
                "logging": stats([rest(x) + (diag["median"] or 0.0) / every for x in f]),
                "step": stats([median_of(x, c) for x in f]),
            },
        }
    return out
