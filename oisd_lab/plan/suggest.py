"""Settings that make a run fit: each candidate is planned the same way (a new trace where the
step changes; strategy changes reuse the trace, since they only move the persistent state)."""

from __future__ import annotations

import copy


def with_overrides(cfg, overrides: dict):
    """A copy of `cfg` with dotted fields set (`{"grpo.micro_batch_size": 4}`)."""
    out = copy.deepcopy(cfg)
    for key, value in overrides.items():
        *path, name = key.split(".")
        target = out
        for part in path:
            target = getattr(target, part)
        setattr(target, name, value)
    return out


def candidates(cfg, world: int) -> list[dict]:
    """One-change candidates first, then combinations; smaller micro-batches in halving order."""
    rows = cfg.grpo.prompts_per_step * cfg.grpo.num_generations
    mb = min(cfg.grpo.micro_batch_size, rows)
    ckpt = {} if cfg.model.gradient_checkpointing else {"model.gradient_checkpointing": True}
    fsdp = {"strategy": "fsdp"} if world > 1 and not str(cfg.strategy).startswith("fsdp") else {}
    out = [c for c in (ckpt, fsdp, {**ckpt, **fsdp}) if c]
    size = mb // 2
    while size >= 1:
        if rows % size == 0:
            micro = {"grpo.micro_batch_size": size}
            out += [micro] + [{**extra, **micro} for extra in (ckpt, fsdp, {**ckpt, **fsdp}) if extra]
        size //= 2
    unique = []
    for c in out:
        if c not in unique:
            unique.append(c)
    return unique


def suggest(cfg, plan_fn, memory_bytes: int, world: int, limit: int = 3, budget: int = 4) -> list[dict]:
    """Up to `limit` candidates that fit, with at most `budget` new traces (`plan_fn(cfg)` caches)."""
    found = []
    for overrides in candidates(cfg, world):
        plan = plan_fn(with_overrides(cfg, overrides))
        if plan is None:  # the trace budget is spent
            break
        if plan.fits(memory_bytes):
            found.append({"overrides": [f"{k}={str(v).lower() if isinstance(v, bool) else v}"
                                        for k, v in overrides.items()],
                          "peak_bytes": plan.peak, "required_bytes": plan.required,
                          "peak_phase": plan.peak_phase})
            if len(found) >= limit:
                break
    return found
