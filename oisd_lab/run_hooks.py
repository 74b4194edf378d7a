"""What a run records every `log.every_n_steps` steps: completions JSONL, per-layer diagnostics
(local `diagnostics.jsonl` with every layer and split, bounded scalars for W&B and the metrics
table, a W&B table with per-head detail), and snapshots for notebooks. Writes only where `RunDir`
says, and only on rank 0."""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from . import diagnostics
from .files import append_jsonl
from .lens import Readout


@dataclass
class PolicyView:
    """What a logging step reads of the trainer: the policy that sampled the rollout and its
    readout, for the per-layer view; W&B loggers for the per-head table."""

    policy: torch.nn.Module
    readout: Readout
    tokenizer: object
    student_layers: list[int]
    device: torch.device
    is_rank_zero: bool
    wandb_loggers: list

MAX_DIAG_ROWS = 64  # rollouts per diagnostics pass: enough for stable means, cheap at any scale


class LogStepHook:
    """Callable invoked by `OISDModule` on logging steps; returns extra metrics to log."""

    def __init__(self, cfg, run):
        self.cfg = cfg
        self.run = run

    def __call__(self, view: PolicyView, step, problems, rollout) -> dict:
        """The logging step of `rollout` (with its rewards and advantages), sampled for `problems`."""
        if not view.is_rank_zero:
            return {}
        self.write_completions(step, problems, rollout)
        if not self.cfg.log.layer_diagnostics:
            return {}
        rows = self.diagnose(view, rollout, step)
        self.write_jsonl(self.run.diagnostics, [{"step": step, **r} for r in rows])
        self.write_snapshot(view, step, rollout)
        layers = self.cfg.log.diag_layers or diagnostics.default_diag_layers(view.readout.num_layers)
        self.log_table(view.wandb_loggers, step, rows)
        return diagnostics.scalar_metrics(rows, list(layers))

    def diagnose(self, view: PolicyView, rollout, step: int = 0) -> list[dict]:
        """Metrics of the diagnosed layers (`rollout` with its rewards and advantages) on
        `log.diag_rollouts` rollouts sampled from the step's
        first `MAX_DIAG_ROWS` (all of those when it is 0), in passes of `diagnostics.diag_rows`
        rollouts (bounded memory: see `diagnostics`)."""
        population = min(len(rollout), MAX_DIAG_ROWS)
        count = self.cfg.log.diag_rollouts
        sampled = 0 < count < population
        picked = diagnostics.sample_rollouts(population, count, seed=self.cfg.seed * 1_000_003 + step)
        mb = diagnostics.diag_rows(rollout.input_ids.shape[1], self.cfg.grpo.micro_batch_size)
        all_layers = diagnostics.diagnosed_layers(view.readout.num_layers, self.cfg.log.diag_layers,
                                                  view.student_layers)
        parts = []
        for lo in range(0, len(picked), mb):
            rows = picked[lo : lo + mb]
            part = rollout.select(rows).to(view.device)
            parts.append(diagnostics.layer_metrics(
                view.policy, view.readout, part, part.advantages, part.rewards, all_layers, self.cfg.method.chunk_size, per_rollout=sampled))
        return diagnostics.combine(parts, population if sampled else None)

    def write_snapshot(self, view: PolicyView, step, rollout) -> None:
        k = self.cfg.log.snapshot_rollouts
        if k <= 0:
            return
        adv = rollout.advantages
        order = torch.argsort(adv, descending=True).tolist()
        picks = sorted(set(order[: (k + 1) // 2] + order[-(k // 2):] if k > 1 else order[:1]))
        part = rollout.select(slice(0, len(rollout))).to(view.device)
        snaps = diagnostics.snapshot(view.policy, view.readout, part, picks, view.student_layers, view.tokenizer,
                                     self.cfg.method.chunk_size)
        for s in snaps:
            s["advantage"] = float(adv[s["row"]])
            s["student_layers"] = view.student_layers
        self.run.snapshots.mkdir(parents=True, exist_ok=True)
        self.run.snapshot(step).write_text(json.dumps({"step": step, "rollouts": snaps}))

    def write_completions(self, step, problems, rollout) -> None:
        G, rewards, adv = self.cfg.grpo.num_generations, rollout.rewards, rollout.advantages
        lengths = rollout.completion_mask.sum(1).tolist()
        rows = [{"step": step, "prompt": problems[i // G].prompt, "answer": problems[i // G].answer,
                 "completion": text, "reward": float(rewards[i]), "advantage": float(adv[i]),
                 "length": int(lengths[i]), "truncated": bool(rollout.truncated[i])}
                for i, text in enumerate(rollout.texts)]
        self.write_jsonl(self.run.completions, rows)

    @staticmethod
    def write_jsonl(path, rows: list[dict]) -> None:
        """Append `rows` to one of the run's JSON-lines files (`files.append_jsonl`)."""
        append_jsonl(path, rows)

    @staticmethod
    def log_table(wandb_loggers, step, rows) -> None:
        """Per-layer, per-head detail as a W&B table (not as thousands of scalar keys)."""
        if not wandb_loggers:
            return
        cols = ["step", "layer", "split", "tokens", *diagnostics.METRICS, "attn_jsd_head"]
        data = [[step, r["layer"], r["split"], r["tokens"], *[r.get(m) for m in diagnostics.METRICS],
                 json.dumps(r.get("attn_jsd_head"))] for r in rows]
        for lg in wandb_loggers:
            lg.log_table(key="diag/layers", columns=cols, data=data, step=step)  # the training step, as every W&B row
