"""How per-token losses become one number: `aggregate` with the normaliser of each loss_type
(`aggregation_of`), the OISD alignment loss (a divergence weighted by the advantages and
aggregated as the policy loss), its schedule, and the divergence sums by advantage sign. Part of
`oisd_lab.losses`."""

from __future__ import annotations

import torch
from torch import Tensor

from ..options import LOSS_TYPES, SCHEDULES
from ..registry import POLICY_LOSSES
from .policy import advantage_weights


def aggregation_of(loss_type: str) -> str:
    """The `aggregate` normaliser of a policy loss_type (its registered `aggregation`): TRL's
    `cispo` divides as `dapo` (tokens of the whole batch), `sapo` as `grpo` (mean of per-sequence
    means); the others are their own."""
    return POLICY_LOSSES.meta(loss_type, "aggregation", loss_type)


def aggregate(
    per_token: Tensor,
    mask: Tensor,
    loss_type: str = "dapo",
    num_items_in_batch: int | Tensor | None = None,
    max_completion_length: int | None = None,
    num_sequences: int | None = None,
    num_micro_batches: int = 1,
) -> Tensor:
    """Reduce a per-token loss [B, T] with completion mask [B, T] to a scalar (docs/grpo-conventions.md, section 5).

    With l = per_token, M = mask (masked slots are ignored through torch.where, so they may hold
    1e4, inf or NaN):
    - `grpo`:    sum_i (sum_t M l / max(sum_t M, 1)) / num_sequences     (TRL loss_type="grpo")
    - `bnpo`:    sum M l / max(sum M, 1) / num_micro_batches, over this micro-batch (TRL "bnpo")
    - `dapo`:    sum M l / num_items_in_batch                              (TRL and verl default)
    - `dr_grpo`: sum M l / (num_sequences * max_completion_length)         (TRL "dr_grpo")
    - `luspo`:   sum M l / num_sequences: each completion's mean loss times its length (TRL
                 "luspo" at sequence level, where l is constant along a completion; TRL's
                 formula, a mean over every [B, T] slot of l times the length, also counts
                 padded slots when l varies by token, this one does not)
    Defaults: num_items_in_batch = sum M of this call, num_sequences = B, max_completion_length = T.

    Micro-batching contract: for `grpo`, `dapo` and `dr_grpo`, pass the whole accumulated batch's
    num_sequences / num_items_in_batch (and the configured max_completion_length) to every
    micro-batch call; the SUM of the micro-batch values (and of their gradients) then equals the
    whole-batch value. `bnpo` is local by definition: pass the number of micro-batches K (TRL divides
    by its gradient accumulation steps), so that the SUM of the K micro-batch values is their
    mean, which equals the whole-batch value when micro-batches hold equal token counts. Under data
    parallelism the caller also divides by the world size, or passes global counts.
    A sequence with no mask tokens contributes 0 (never NaN).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {LOSS_TYPES}")
    if per_token.shape != mask.shape or per_token.dim() != 2:
        raise ValueError(
            f"per_token {tuple(per_token.shape)} and mask {tuple(mask.shape)} must both be [B, T]"
        )
    mask = mask.bool()
    masked = torch.where(mask, per_token, 0.0)  # not per_token * mask: inf * 0 = NaN
    batch, length = per_token.shape
    n_seq = max(batch if num_sequences is None else int(num_sequences), 1)
    if loss_type == "grpo":
        seq_means = masked.sum(-1) / mask.sum(-1).clamp(min=1)
        return seq_means.sum() / n_seq
    total = masked.sum()
    if loss_type == "luspo":
        return total / n_seq
    if loss_type == "bnpo":
        return total / mask.sum().clamp(min=1) / max(int(num_micro_batches), 1)
    if loss_type == "dapo":
        n_items = mask.sum() if num_items_in_batch is None else num_items_in_batch
        return total / torch.as_tensor(n_items, device=total.device).clamp(min=1)
    t_max = length if max_completion_length is None else int(max_completion_length)
    return total / (n_seq * t_max)


# --------------------------------------------------------------------------- OISD loss


def alignment_loss(
    per_token_div: Tensor,
    mask: Tensor,
    advantages: Tensor,
    weighting: str = "signed",
    loss_type: str = "dapo",
    rewards: Tensor | None = None,
    **agg_kwargs,
) -> Tensor:
    """L_think / L_attn: aggregate over tokens of w_i * d_{i,t} with the normaliser `loss_type`:
    the policy loss's unless `method.align_loss_type` is set (`step.loss_terms` chooses).

    per_token_div [B, T] (from `chunked_lens_jsd` scattered back to [B, T], or
    `attention_row_jsd`), mask [B, T], advantages [B] (detached here) or [B, T]; weighting in
    WEIGHTINGS (`advantage_weights`; rewards [B] for `reward`); loss_type and agg_kwargs as in
    `aggregate`, so the same micro-batching contract holds.
    """
    weights = advantage_weights(advantages.detach(), weighting, rewards)
    if weights.dim() == per_token_div.dim() - 1:
        weights = weights.unsqueeze(-1)  # [B] -> [B, 1]
    return aggregate(weights * per_token_div, mask, loss_type, **agg_kwargs)


def alignment_scale(step: int, schedule: str = "constant", steps: int = 0) -> float:
    """Multiplier of both alignment weights at optimisation step `step` (1-based).

    `constant`: 1 (the paper). `stop`: 1 for steps 1..N, then 0 (BuPO-like early phase; HASTE
    finds that alignment helps early and conflicts later). `linear`: 1 - (step - 1) / N, down
    to 0 at step N + 1 and after. N = `steps` (>= 1 for `stop` and `linear`).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown alignment schedule {schedule!r}; choose one of {SCHEDULES}")
    if schedule == "constant":
        return 1.0
    if steps < 1:
        raise ValueError(f"alignment schedule {schedule!r} needs steps >= 1, got {steps}")
    if schedule == "stop":
        return 1.0 if step <= steps else 0.0
    return max(0.0, 1.0 - (step - 1) / steps)


ADVANTAGE_SIGNS = ("pos", "neg", "zero")


def divergence_sums(per_token_div: Tensor, mask: Tensor, advantages: Tensor) -> dict[str, Tensor]:
    """Token sums of an unweighted per-token divergence, split by the sign of the advantage.

    per_token_div [B, T], mask [B, T], advantages [B]. Returns detached scalars
    `div_<s>` = sum over masked tokens of rollouts with sign s of d_{i,t}, and `tokens_<s>` = their
    count, for s in pos (A > 0), neg (A < 0), zero (A == 0). Sums (not means) so that
    micro-batches add up; the mean of split s is div_s / tokens_s.
    """
    mask = mask.bool()
    adv = advantages.detach().reshape(-1, 1)  # [B, 1]
    masked = torch.where(mask, per_token_div.detach(), 0.0)
    out = {}
    for sign, rows in zip(ADVANTAGE_SIGNS, (adv > 0, adv < 0, adv == 0), strict=True):
        out[f"div_{sign}"] = (masked * rows).sum()
        out[f"tokens_{sign}"] = (mask & rows).sum().to(masked.dtype)
    return out
