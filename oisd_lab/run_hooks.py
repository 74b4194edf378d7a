"""What a run records every `log.every_n_steps` steps: completions JSONL, per-layer diagnostics
(local `diagnostics.jsonl` with every layer and split, bounded scalars for W&B and the metrics
table, a W&B table with per-head detail), and snapshots for notebooks. Writes only where `RunDir`
says, and only on rank 0."""

from __future__ import annotations

import json

import torch

from . import diagnostics

MAX_DIAG_ROWS = 64  # rollouts per diagnostics pass: enough for stable means, cheap at any scale


class LogStepHook:
    """Callable invoked by `OISDModule` on logging steps; returns extra metrics to log."""

    def __init__(self, cfg, run):
        self.cfg = cfg
        self.run = run

    def __call__(self, module, step, problems, rollout, rewards, adv) -> dict:
        if module.global_rank != 0:
            return {}
        self.write_completions(step, problems, rollout, rewards, adv)
        rows = self.diagnose(module, rollout, rewards, adv)
        self.write_jsonl(self.run.root / "diagnostics.jsonl", [{"step": step, **r} for r in rows])
        self.write_snapshot(module, step, rollout, adv)
        layers = self.cfg.log.diag_layers or diagnostics.default_diag_layers(module.num_layers)
        self.log_table(module, step, rows)
        return diagnostics.scalar_metrics(rows, list(layers))

    def diagnose(self, module, rollout, rewards, adv) -> list[dict]:
        n = min(len(rollout), MAX_DIAG_ROWS)
        mb = self.cfg.grpo.micro_batch_size
        all_layers = list(range(0, module.num_layers + 1))
        parts = []
        for lo in range(0, n, mb):
            part = rollout.select(slice(lo, min(lo + mb, n)))
            part = _to_device(part, module.device)
            parts.append(diagnostics.layer_metrics(
                module.policy, module.readout, part, adv[lo : lo + mb].to(module.device),
                rewards[lo : lo + mb].to(module.device), all_layers, self.cfg.method.chunk_size))
        return diagnostics.combine(parts)

    def write_snapshot(self, module, step, rollout, adv) -> None:
        k = self.cfg.log.snapshot_rollouts
        if k <= 0:
            return
        order = torch.argsort(adv, descending=True).tolist()
        picks = sorted(set(order[: (k + 1) // 2] + order[-(k // 2):] if k > 1 else order[:1]))
        part = _to_device(rollout.select(slice(0, len(rollout))), module.device)
        snaps = diagnostics.snapshot(module.policy, module.readout, part, picks, module.student_layers,
                                     module.tokenizer)
        for s in snaps:
            s["advantage"] = float(adv[s["row"]])
            s["student_layers"] = module.student_layers
        self.run.snapshots.mkdir(parents=True, exist_ok=True)
        (self.run.snapshots / f"step_{step:06d}.json").write_text(json.dumps({"step": step, "rollouts": snaps}))

    def write_completions(self, step, problems, rollout, rewards, adv) -> None:
        G = self.cfg.grpo.num_generations
        lengths = rollout.completion_mask.sum(1).tolist()
        rows = [{"step": step, "prompt": problems[i // G].prompt, "answer": problems[i // G].answer,
                 "completion": text, "reward": float(rewards[i]), "advantage": float(adv[i]),
                 "length": int(lengths[i]), "truncated": bool(rollout.truncated[i])}
                for i, text in enumerate(rollout.texts)]
        self.write_jsonl(self.run.completions, rows)

    @staticmethod
    def write_jsonl(path, rows: list[dict]) -> None:
        with open(path, "a") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")

    @staticmethod
    def log_table(module, step, rows) -> None:
        """Per-layer, per-head detail as a W&B table (not as thousands of scalar keys)."""
        from lightning.pytorch.loggers import WandbLogger

        for lg in module.loggers:
            if isinstance(lg, WandbLogger):
                cols = ["step", "layer", "split", "tokens", *diagnostics.METRICS, "attn_jsd_head"]
                data = [[step, r["layer"], r["split"], r["tokens"], *[r.get(m) for m in diagnostics.METRICS],
                         json.dumps(r.get("attn_jsd_head"))] for r in rows]
                lg.log_table(key="diag/layers", columns=cols, data=data, step=step)


def _to_device(part, device):
    from .module import _to

    return _to(part, device)
