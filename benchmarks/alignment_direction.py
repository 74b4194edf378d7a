"""Which way does the logit-alignment gradient move the student: toward the teacher or away?

On sampled rollouts of a fixed policy, the script takes the gradient of L_think under several
(weighting, aggregator) variants and compares each with the gradient of the UNWEIGHTED mean
divergence ("the pull"): the gradient of the token mean (`dapo`) and of the sequence mean
(`grpo`) of JSD(sg[p_L] || p_l) over the same rollouts. A plain gradient step -lr g changes the
mean divergence D by -lr <grad D, g> to first order, so cos(g, grad D) > 0 means the term pulls
the student toward the teacher and < 0 pushes it away. All variants see the same rollouts and the
same parameters, so their differences come from the weighting and the aggregator alone. (AdamW
preconditions the step; the sign is that of plain gradient descent.)

    PYTHONPATH=. python benchmarks/alignment_direction.py --start <checkpoint dir> --batches 3 \
        --out /tmp/direction.json task=arith grpo.max_completion_length=96 ...

Per batch it also records the rollout statistics the length argument rests on: cov(A, length),
the within-group length std, and the mean length of rollouts with positive and negative advantage.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys

import torch

from oisd_lab import losses
from oisd_lab.config import compose
from oisd_lab.gradient_view import (
    advantage_length_cov,
    frac_zero_advantage_groups,
    grad_cosine,
    grad_norm,
)
from oisd_lab.module import OISDModule
from oisd_lab.run.loading import load_start
from oisd_lab.sampler import Sampler
from oisd_lab.sources import load_source

VARIANTS = {
    "signed/dapo": ("signed", "dapo"),
    "signed/grpo": ("signed", "grpo"),
    "unsigned/dapo": ("unsigned", "dapo"),
    "positive/dapo": ("positive", "dapo"),
}
"""name -> (weighting, alignment aggregator) of L_think; the policy loss is irrelevant here."""
PULLS = {"pull/dapo": ("uniform", "dapo"), "pull/grpo": ("uniform", "grpo")}
"""The unweighted mean divergence: over tokens (dapo) and over sequences (grpo)."""


def think_gradient(module: OISDModule, rollout, adv: torch.Tensor, weighting: str, agg: str) -> list:
    """Gradient of L_think (logit weight 1, no attention) of the whole rollout under `weighting` and
    the alignment aggregator `agg`, summed over the module's micro-batches; one entry per parameter."""
    method = dataclasses.replace(module.cfg.method, logit_weight=1.0, attn_weight=0.0, weighting=weighting,
                                 think_weighting=None, align_loss_type=agg)
    saved, module.objective = module.objective, dataclasses.replace(module.objective, method=method, align_scale=1.0)
    params = [p for p in module.policy.parameters() if p.requires_grad]
    total: list = [None] * len(params)
    try:
        norm = module.normalisers(rollout)
        for part in module.micro_batches(rollout.scored(adv)):
            loss = module.loss_terms(part, norm)["loss/think"]
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            total = [g if t is None else (t if g is None else t + g) for t, g in zip(total, grads, strict=True)]
    finally:
        module.objective = saved
    return total


def length_stats(adv: torch.Tensor, lengths: torch.Tensor, G: int) -> dict[str, float]:
    """cov(A, length), mean within-group length std (population), mean lengths by advantage sign."""
    groups = lengths.double().reshape(-1, G)
    out = {"cov_adv_length": advantage_length_cov(adv, lengths),
           "within_group_length_std": float(groups.std(dim=1, correction=0).mean()),
           "frac_zero_adv_groups": frac_zero_advantage_groups(adv, G),
           "mean_length": float(lengths.double().mean())}
    for name, rows in (("pos", adv > 0), ("neg", adv < 0)):
        out[f"mean_length_{name}"] = float(lengths[rows].double().mean()) if rows.any() else float("nan")
    return out


def direction(module: OISDModule, rollout, adv: torch.Tensor) -> dict[str, float]:
    """For every variant: its gradient norm and cosines with both pulls; plus the pulls' cosine."""
    pulls = {name: think_gradient(module, rollout, adv, *how) for name, how in PULLS.items()}
    out = {"cos/pull_dapo~pull_grpo": grad_cosine(pulls["pull/dapo"], pulls["pull/grpo"])}
    for name, how in VARIANTS.items():
        g = think_gradient(module, rollout, adv, *how)
        out[f"{name}/norm"] = grad_norm(g)
        for pull, p in pulls.items():
            out[f"{name}/cos_{pull.replace('/', '_')}"] = grad_cosine(g, p)
    return out


def measure(cfg, start_dir: str, batches: int) -> list[dict]:
    """Rollout statistics and direction cosines of `batches` rollout batches (train steps 1..n)."""
    model, tokenizer = load_start(cfg, start_dir)
    source = load_source(cfg.task)
    sampler = Sampler(cfg, model, tokenizer, source, source.reward,
                      format_prompt=lambda text: source.format_prompt(text, tokenizer, cfg.model.chat_template))
    module = OISDModule(cfg, model, tokenizer, sampler)
    rows = []
    for step in range(1, batches + 1):
        torch.manual_seed(cfg.seed * 1_000_003 + step * 9_973)
        problems, rollout = module.sampler(step, 0, 1)
        G = cfg.grpo.num_generations
        rewards = torch.tensor([source.reward(t, problems[i // G].answer) for i, t in enumerate(rollout.texts)],
                               dtype=torch.float32)
        g = cfg.grpo
        adv = losses.group_advantages(rewards, G, g.scale_rewards, g.adv_eps, g.std_ddof)
        lengths = rollout.completion_mask.sum(1)
        row = {"step": step, "reward": float(rewards.mean()), **length_stats(adv, lengths, G)}
        row.update(direction(module, rollout, adv))
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def summary(rows: list[dict]) -> dict[str, float]:
    """Mean over batches of every numeric field (a batch without rollouts of one sign has NaN there
    and is left out of that field's mean)."""
    keys = [k for k in rows[0] if k != "step"]
    return {k: statistics.fmean(v) if (v := [r[k] for r in rows if math.isfinite(r[k])]) else math.nan
            for k in keys}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--start", required=True, help="checkpoint directory (a warm start or final_model)")
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--out", default=None, help="JSON file for the rows and their mean")
    parser.add_argument("overrides", nargs="*", help="config key=value, as for oisd-lab train")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cfg = compose(args.overrides)
    rows = measure(cfg, args.start, args.batches)
    result = {"start": args.start, "overrides": args.overrides, "rows": rows, "mean": summary(rows)}
    print(json.dumps(result["mean"], indent=1))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
