"""What a run records every `log.every_n_steps` steps: completions JSONL, per-layer diagnostics,
and snapshots for notebooks. Called by the module; writes only where `RunDir` says."""

from __future__ import annotations

import json

import torch


class LogStepHook:
    """Callable invoked by `OISDModule` on logging steps; returns extra metrics to log."""

    def __init__(self, cfg, run):
        self.cfg = cfg
        self.run = run

    def __call__(self, module, step, problems, rollout, rewards, adv) -> dict:
        if module.global_rank == 0:
            self.write_completions(module, step, problems, rollout, rewards, adv)
        return {}

    def write_completions(self, module, step, problems, rollout, rewards, adv) -> None:
        G = self.cfg.grpo.num_generations
        lengths = rollout.completion_mask.sum(1).tolist()
        with open(self.run.completions, "a") as handle:
            for i, text in enumerate(rollout.texts):
                p = problems[i // G]
                row = {"step": step, "prompt": p.prompt, "answer": p.answer, "completion": text,
                       "reward": float(rewards[i]), "advantage": float(adv[i]),
                       "length": int(lengths[i]), "truncated": bool(rollout.truncated[i])}
                handle.write(json.dumps(row) + "\n")


__all__ = ["LogStepHook", "torch"]
