"""Pure tensor functions for the GRPO policy loss and the OISD alignment losses.

Everything the trainer optimises or logs as a loss is computed here, from tensors only: no model,
no `self`, no logging, no distributed reductions (the caller passes whole-batch normalisers such
as `num_items_in_batch`). Each docstring gives shapes, the formula, and the reference it mirrors
(TRL `GRPOTrainer` / `trl.trainer.utils`, verl `core_algos`, TRL GKD for the JSD).

Shapes: B sequences (prompts * num_generations, group-contiguous), T completion positions,
V vocabulary, H heads, S keys, N selected completion tokens, D hidden size.

Where this module departs from, or fills gaps in, the paper (arXiv 2605.29089) and the references:

- The paper states signed, advantage-weighted JSD for both channels; the weighting modes other
  than `signed`, the per-head option, sink exclusion and the use of the policy's loss aggregator
  for the alignment losses are our reconstruction (see docs/oisd-method.md, section 3).
- `jsd` with beta in {0, 1} returns 0 (the continuous limit of the formula). TRL's GKD instead
  switches to a plain KL at those two values.
- JSD values are clamped at 0: log-space rounding leaves ~1e-8 of either sign when P == Q, and
  a negative divergence would invert the meaning of signed weighting.
- The log-ratio inside `clipped_surrogate` and `kl_k3` is clamped to [-20, 20] as verl does, so
  garbage in padded slots cannot produce inf values or NaN gradients. TRL does not clamp.
- `importance_ratio` and `sampler_importance_weights` clamp their log-ratios to [-20, 20] as well
  (TRL does not); no clip or cap in use comes near e^20.
- `group_advantages` returns exactly 0 for a group of identical rewards, even where float
  rounding of the group mean would leave a residue.
- `aggregate(loss_type="grpo")` accepts `num_sequences` so that micro-batch values sum to the
  whole-batch value (TRL instead divides by the number of accumulation steps, exact only for
  equal-sized micro-batches). `bnpo` takes `num_micro_batches` and divides by it, as TRL does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from types import SimpleNamespace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from .options import (
    HEAD_AGG,
    HEAD_REDUCE,
    IS_LEVELS,
    KL_ESTIMATORS,
    LOSS_TYPES,
    SAMPLER_IS_MODES,
    SCALE_REWARDS,
    SCHEDULES,
    WEIGHTINGS,
)
from .registry import ADVANTAGE_ESTIMATORS, POLICY_LOSSES

LOG_RATIO_CLAMP = 20.0  # verl's bound on log(pi/pi_old); e^20 is far past any clip range


def _upcast(x: Tensor) -> Tensor:
    # bf16/fp16 log-softmax over a 150k vocabulary loses several digits; compute in fp32.
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


# --------------------------------------------------------------------------- advantages


def group_advantages(
    rewards: Tensor,
    num_generations: int,
    scale_rewards: str = "group",
    eps: float = 1e-4,
    std_ddof: int = 1,
) -> Tensor:
    """GRPO advantages, one per completion. Mirrors TRL `GRPOTrainer._generate_and_score_completions`.

    rewards: [B], group-contiguous (B = prompts * num_generations). Returns [B]:
    - `group`: A_i = (r_i - mean_group r) / (std_group r + eps)
    - `batch`: A_i = (r_i - mean_group r) / (std_batch r + eps)   (TRL scale_rewards="batch")
    - `none`:  A_i = r_i - mean_group r                           (Dr. GRPO)
    std uses `correction=std_ddof` (1 = Bessel, as TRL/verl/OpenRLHF; 0 = population).
    A group of identical rewards gives exactly 0 for every member.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [B], got shape {tuple(rewards.shape)}")
    n = rewards.shape[0]
    if num_generations < 1 or n % num_generations:
        raise ValueError(
            f"{n} rewards are not divisible by num_generations={num_generations}: "
            "B must be prompts * num_generations"
        )
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"unknown scale_rewards {scale_rewards!r}; choose one of {SCALE_REWARDS}")
    rewards = rewards if rewards.is_floating_point() else rewards.float()
    grouped = rewards.view(-1, num_generations)  # [P, G]
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    # Compare with the first member rather than trusting mean rounding (or a NaN std at G=1).
    constant = (grouped == grouped[:, :1]).all(dim=1, keepdim=True)
    if num_generations == 1 or scale_rewards == "none":
        scaled = centred
    elif scale_rewards == "group":
        scaled = centred / (grouped.std(dim=1, correction=std_ddof, keepdim=True) + eps)
    else:
        scaled = centred / (rewards.std(correction=std_ddof) + eps)
    return torch.where(constant, 0.0, scaled).reshape(-1)


def grpo_estimator(rewards: Tensor, lengths: Tensor, num_generations: int, options) -> Tensor:
    """Registered as grpo: `group_advantages` with options.scale_rewards, adv_eps, std_ddof."""
    return group_advantages(rewards, num_generations, options.scale_rewards, options.adv_eps, options.std_ddof)


def rloo_estimator(rewards: Tensor, lengths: Tensor, num_generations: int, options=None) -> Tensor:
    """RLOO (arXiv 2402.14740), as verl `compute_rloo_outcome_advantage`: each completion's reward
    minus the mean of the other G - 1 in its group, A_i = G / (G - 1) (r_i - mean_group r);
    a group of one keeps its reward. No scaling."""
    G = num_generations
    rewards = rewards if rewards.is_floating_point() else rewards.float()
    if G == 1:
        return rewards.clone()
    grouped = rewards.view(-1, G)
    return (grouped * G / (G - 1) - grouped.mean(dim=1, keepdim=True) * G / (G - 1)).reshape(-1)


def _token_whiten(values: Tensor, lengths: Tensor) -> Tensor:
    """verl `masked_whiten` of a per-sequence value repeated over each sequence's `lengths` tokens:
    (v - mean) / sqrt(var + 1e-8), mean and Bessel-corrected variance over all those tokens (a
    sequence counts once per token), mean with verl's + 1e-8 in its denominator."""
    n = lengths.sum()
    if n <= 1:
        raise ValueError("REINFORCE++ whitens over the batch's completion tokens: it needs at least 2")
    w = lengths.to(values.dtype)
    mean = (values * w).sum() / (n + 1e-8)
    var = ((values - mean) ** 2 * w).sum() / (n + 1e-8) * n / (n - 1)
    return (values - mean) * torch.rsqrt(var + 1e-8)


def reinforce_plus_plus_estimator(rewards: Tensor, lengths: Tensor, num_generations: int, options=None) -> Tensor:
    """REINFORCE++ (arXiv 2501.03262), as verl `compute_reinforce_plus_plus_outcome_advantage` with
    its default gamma = 1: every token's return is the outcome reward, whitened over all completion
    tokens of the batch (no group baseline)."""
    rewards = rewards if rewards.is_floating_point() else rewards.float()
    return _token_whiten(rewards, lengths)


def reinforce_plus_plus_baseline_estimator(rewards: Tensor, lengths: Tensor, num_generations: int,
                                           options=None) -> Tensor:
    """REINFORCE++-baseline, as verl `compute_reinforce_plus_plus_baseline_outcome_advantage`: the
    reward minus its group's mean (0 for a group of one), then whitened over all completion tokens
    of the batch."""
    rewards = rewards if rewards.is_floating_point() else rewards.float()
    grouped = rewards.view(-1, num_generations)
    centred = grouped - grouped.mean(dim=1, keepdim=True) if num_generations > 1 else grouped
    return _token_whiten(centred.reshape(-1), lengths)


def normalize_then_sum_advantages(per_func: Tensor, weights: Tensor, num_generations: int) -> Tensor:
    """TRL's `multi_objective_aggregation="normalize_then_sum"` (GDPO): each reward function's
    rewards [B, K] are normalised within their group, (r - mean) / (std + 1e-4) (Bessel std),
    summed with `weights` [K], and the sums normalised over the batch the same way. [B]."""
    grouped = per_func.float().view(-1, num_generations, per_func.shape[1])
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, keepdim=True) if num_generations > 1 else torch.zeros_like(mean)
    summed = (((grouped - mean) / (std + 1e-4)).reshape(-1, per_func.shape[1]) * weights.to(grouped)).sum(1)
    spread = summed.std() if summed.numel() > 1 else torch.zeros(())
    return (summed - summed.mean()) / (spread + 1e-4)


def advantages_of(rewards: Tensor, lengths: Tensor, num_generations: int, options) -> Tensor:
    """The advantages [B] of `options.advantage_estimator` (`registry.ADVANTAGE_ESTIMATORS`)."""
    if num_generations < 1 or rewards.shape[0] % num_generations:
        raise ValueError(f"{rewards.shape[0]} rewards are not divisible by num_generations={num_generations}: "
                         "B must be prompts * num_generations")
    return ADVANTAGE_ESTIMATORS.get(options.advantage_estimator)(rewards, lengths, num_generations, options)


def advantage_weights(advantages: Tensor, mode: str, rewards: Tensor | None = None) -> Tensor:
    """OISD per-sequence weight w_i for the alignment losses (docs/oisd-method.md, section 3).

    advantages: any shape; returns the same shape.
    `signed`: A (pull toward the teacher when above average, push away when below);
    `unsigned`: |A|; `positive`: max(A, 0); `uniform`: 1 (plain self-distillation);
    `reward`: the rollout's reward r_i (same shape as advantages; pulls on every rewarded
    rollout, also in groups whose rewards are all equal, where A = 0).
    """
    if mode == "reward":
        if rewards is None:
            raise ValueError("weighting 'reward' needs the rollouts' rewards; pass rewards=")
        return rewards.to(advantages.dtype)
    if mode == "signed":
        return advantages
    if mode == "unsigned":
        return advantages.abs()
    if mode == "positive":
        return advantages.clamp(min=0)
    if mode == "uniform":
        return torch.ones_like(advantages)
    raise ValueError(f"unknown method.weighting {mode!r}; choose one of {WEIGHTINGS}")


# --------------------------------------------------------------------------- log-probs


def _logps_chunk(logits: Tensor, index: Tensor, temperature: float) -> Tensor:
    logits = _upcast(logits)
    if temperature != 1.0:
        logits = logits / temperature
    picked = logits.gather(-1, index.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


class _TokenLogps(torch.autograd.Function):
    """log softmax(z / T)[index] over rows of [n, V] logits, block by block, with a hand-written
    backward: d logp_i / d z_iv = (1[v = index_i] - softmax(z_i / T)_v) / T.

    Forward keeps only the [n] log-normalisers; backward recomputes each block's softmax from
    them (one exp) and writes straight into one [n, V] gradient, so neither pass holds more than
    a [block, V] temporary and no autograd graph of the block's ops is built or replayed.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, index: Tensor, temperature: float, block: int) -> Tensor:
        out, lse = [], []
        for lg, ix in zip(logits.split(block), index.split(block), strict=True):
            z = _upcast(lg) / temperature if temperature != 1.0 else _upcast(lg)
            lse.append(torch.logsumexp(z, dim=-1))
            out.append(z.gather(-1, ix.unsqueeze(-1)).squeeze(-1) - lse[-1])
        ctx.save_for_backward(logits, index, torch.cat(lse))
        ctx.temperature, ctx.block = temperature, block
        return torch.cat(out)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        logits, index, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        scale = grad_out / ctx.temperature  # [n]
        for lo in range(0, logits.shape[0], ctx.block):
            rows = slice(lo, lo + ctx.block)
            z = _upcast(logits[rows])
            z = z / ctx.temperature if ctx.temperature != 1.0 else z
            g = (z - lse[rows, None]).exp_()  # softmax(z / T), a fresh [block, V] tensor
            g.mul_(-scale[rows, None]).scatter_add_(-1, index[rows, None], scale[rows, None])
            grad[rows] = g
        return grad, None, None, None


def _chunked_logps(logits: Tensor, index: Tensor, chunk_size: int, temperature: float) -> Tensor:
    if logits.shape[:-1] != index.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and index {tuple(index.shape)} disagree")
    flat, flat_index = logits.reshape(-1, logits.shape[-1]), index.reshape(-1)
    if flat.shape[0] == 0:
        return _upcast(flat).new_zeros(index.shape)
    if torch.is_grad_enabled() and logits.requires_grad:
        return _TokenLogps.apply(flat, flat_index, float(temperature), chunk_size).reshape(index.shape)
    pieces = [_logps_chunk(lg, ix, temperature)
              for lg, ix in zip(flat.split(chunk_size), flat_index.split(chunk_size), strict=True)]
    return torch.cat(pieces).reshape(index.shape)


def selective_log_softmax(logits: Tensor, index: Tensor, chunk_size: int = 512) -> Tensor:
    """log softmax(logits)[index] without materialising the full log-softmax.

    logits [..., V], index [...] (int64) -> [...]. Mirrors TRL `selective_log_softmax`
    (gather minus logsumexp), in chunks of `chunk_size` rows. 16-bit logits are computed and
    returned in float32 (TRL's bf16 path loses precision in the importance ratio).
    """
    return _chunked_logps(logits, index, chunk_size, 1.0)


def token_logps(
    logits: Tensor, tokens: Tensor, temperature: float = 1.0, chunk_size: int = 512
) -> Tensor:
    """Per-token log-probs of sampled tokens, logits divided by the sampling temperature first.

    logits [B, T, V] already aligned so that logits[:, t] predicts tokens[:, t]; tokens [B, T]
    -> [B, T]. TRL `_get_per_token_logps` convention; the division happens per chunk, so no
    second [B, T, V] tensor is created.
    """
    return _chunked_logps(logits, tokens, chunk_size, float(temperature))


def entropy_from_logits(logits: Tensor, chunk_size: int = 512, temperature: float = 1.0) -> Tensor:
    """Entropy H(softmax(logits / temperature)) in nats over the last dim. logits [..., V] -> [...].

    Mirrors TRL `entropy_from_logits` (chunked log-softmax); 0 log 0 = 0, so -inf logits are safe.
    The division happens per chunk (no second [..., V] tensor). Meant for metrics (call under
    `torch.no_grad()`).
    """
    flat = logits.reshape(-1, logits.shape[-1])
    pieces = []
    for chunk in flat.split(chunk_size):
        chunk = _upcast(chunk)
        logp = F.log_softmax(chunk / temperature if temperature != 1.0 else chunk, dim=-1)
        p = logp.exp()
        pieces.append(-torch.where(p > 0, p * logp, 0.0).sum(-1))
    if not pieces:
        return _upcast(flat).new_zeros(logits.shape[:-1])
    return torch.cat(pieces).reshape(logits.shape[:-1])


# --------------------------------------------------------------------------- policy loss


def clipped_surrogate(
    logps: Tensor,
    old_logps: Tensor | None,
    advantages: Tensor,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO/GRPO clipped surrogate per token. Mirrors TRL `GRPOTrainer._compute_loss`.

    logps, old_logps: [B, T] (old_logps None means logps.detach(): one update per rollout batch,
    so rho == 1 in value but not in gradient). advantages: [B] (broadcast over T) or [B, T].
    rho = exp(clamp(logps - old_logps, -20, 20))     (clamp as verl; keeps padding garbage finite)
    per_token_loss = -min(rho * A, clip(rho, 1 - epsilon_low, 1 + epsilon_high) * A)   [B, T]
    info: boolean [B, T] tensors as TRL's clip_ratio metrics (mask them before averaging):
    `is_low_clipped` (rho < 1 - eps_low and A < 0), `is_high_clipped` (rho > 1 + eps_high and
    A > 0), `is_region_clipped` (either).
    """
    old_logps = logps.detach() if old_logps is None else old_logps.detach()
    rho = torch.exp((logps - old_logps).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    return ppo_clip(rho, advantages, epsilon_low, epsilon_high)


def _per_token_advantages(advantages: Tensor, ratio: Tensor) -> Tensor:
    adv = advantages.detach()
    return adv.unsqueeze(-1) if adv.dim() == ratio.dim() - 1 else adv  # [B] -> [B, 1]


def _clip_info(is_low: Tensor, is_high: Tensor) -> dict[str, Tensor]:
    return {"is_low_clipped": is_low, "is_high_clipped": is_high, "is_region_clipped": is_low | is_high}


def ppo_clip(
    ratio: Tensor, advantages: Tensor, epsilon_low: float = 0.2, epsilon_high: float = 0.2,
    delta: float | None = None, clip_ratio_c: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The clipped surrogate of an importance ratio. ratio [B, T] (token level) or [B, 1]
    (sequence level, GSPO), advantages [B] or [B, T] -> per-token loss broadcast of both.

    loss = -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A); info as in `clipped_surrogate`.
    TRL `loss_type` grpo / bnpo / dapo / dr_grpo (and the DAPO "clip higher" eps_high = 0.28).
    delta (TRL's two-sided clip, INTELLECT-2): the unclipped term's ratio is capped at delta,
    -min(min(rho, delta) A, clip(rho) A), which bounds the loss of negative-advantage tokens.
    clip_ratio_c (verl's dual clip, arXiv 1912.09729): for A < 0 the loss is at most -c A,
    min(-c A, the clipped loss). None: off (the plain surrogate, exactly).
    """
    adv = _per_token_advantages(advantages, ratio)
    clipped = ratio.clamp(1.0 - epsilon_low, 1.0 + epsilon_high)
    unclipped = ratio if delta is None else ratio.clamp(max=delta)
    loss = -torch.min(unclipped * adv, clipped * adv)
    if clip_ratio_c is not None:
        loss = torch.where(adv < 0, torch.min(-adv * clip_ratio_c, loss), loss)
    return loss, _clip_info((ratio < 1.0 - epsilon_low) & (adv < 0), (ratio > 1.0 + epsilon_high) & (adv > 0))


def cispo_surrogate(
    logps: Tensor, ratio: Tensor, advantages: Tensor, epsilon_high: float = 5.0
) -> tuple[Tensor, dict[str, Tensor]]:
    """CISPO (MiniMax-M1): REINFORCE with a detached, capped importance weight.

    logps [B, T]; ratio [B, T] or [B, 1]; advantages [B] or [B, T]. Mirrors TRL
    `loss_type="cispo"`: loss = -sg[min(rho, epsilon_high)] * A * logps, so `epsilon_high` is the
    cap on the ratio itself (TRL recommends 5.0), not a distance from 1, and no token loses its
    gradient. verl's CISPO instead clamps rho to the band [1 - clip_ratio_low, 1 + clip_ratio_high]
    (a lower bound too). info: `is_high_clipped` = rho > epsilon_high and A > 0 (TRL's
    `cispo_clip_ratio`), `is_low_clipped` all False.
    """
    adv = _per_token_advantages(advantages, ratio)
    weight = ratio.clamp(max=epsilon_high).detach()
    high = (ratio > epsilon_high) & (adv > 0)
    return -weight * adv * logps, _clip_info(torch.zeros_like(high), high)


def sapo_surrogate(
    ratio: Tensor, advantages: Tensor, temperature_pos: float = 1.0, temperature_neg: float = 1.05
) -> tuple[Tensor, dict[str, Tensor]]:
    """SAPO (Soft Adaptive Policy Optimization): a smooth gate instead of the hard clip.

    ratio [B, T] or [B, 1]; advantages [B] or [B, T]. Mirrors TRL `loss_type="sapo"`:
    tau = temperature_pos where A > 0 else temperature_neg,
    loss = -(4 / tau) * sigmoid(tau (rho - 1)) * A.
    At rho = 1 the gate's slope is exactly 1, so on-policy it has GRPO's gradient; off-policy the
    slope 4 sig (1 - sig) decays smoothly. Nothing is hard-clipped: the info tensors are all False.
    """
    adv = _per_token_advantages(advantages, ratio)
    tau = torch.where(adv > 0, temperature_pos, temperature_neg)
    loss = -torch.sigmoid(tau * (ratio - 1.0)) * 4.0 / tau * adv
    none = torch.zeros(loss.shape, dtype=torch.bool, device=loss.device)
    return loss, _clip_info(none, none)


def vespo_gamma_weights(
    advantages: Tensor, log_ratio: Tensor, mask: Tensor, is_weights: Tensor | None = None,
    k_pos: float = 2.0, lambda_pos: float = 3.0, k_neg: float = 3.0, lambda_neg: float = 2.0,
) -> Tensor:
    """VESPO's sequence weight phi(w) = e^lambda w^k e^(-lambda w) (so phi(1) = 1), detached.

    advantages [B]; log_ratio [B, T] = log pi - log pi_old per token; mask [B, T]; is_weights
    [B, T] (the sampler correction's token weights) or None -> [B, 1]. w is the SEQUENCE ratio,
    log w = sum_t M clamp(log_ratio, -20, 20) (+ sum_t M log is_weights), clamped to [log 1e-8, 20];
    k, lambda are the `_pos` pair where A >= 0 and the `_neg` pair otherwise (lambda floored at
    1e-4); non-finite phi becomes 0. Mirrors TRL `GRPOTrainer.get_gamma_weights` (huggingface/trl
    f2cd577); TRL sums the sampler's log-weights over every position, here over the mask only.
    """
    floor = math.log(1e-8)
    with torch.no_grad():
        maskf = mask.to(log_ratio.dtype)
        log_w = (log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP) * maskf).sum(-1, keepdim=True)
        if is_weights is not None:
            log_is = torch.log(is_weights.expand(mask.shape)).clamp(floor, LOG_RATIO_CLAMP)
            log_w = log_w + torch.where(mask.bool(), log_is, 0.0).sum(-1, keepdim=True)
        log_w = log_w.clamp(floor, LOG_RATIO_CLAMP)
        nonneg = advantages.view(-1, 1) >= 0
        k = torch.where(nonneg, k_pos, k_neg).to(log_w.dtype)
        lam = torch.where(nonneg, lambda_pos, lambda_neg).to(log_w.dtype).clamp(min=1e-4)
        phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
        return phi.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def importance_ratio(logps: Tensor, old_logps: Tensor, mask: Tensor, level: str = "token") -> Tensor:
    """pi / pi_old per token or per sequence. logps, old_logps, mask [B, T] -> [B, T] or [B, 1].

    `token`: rho_t = exp(logps_t - old_t). `sequence` (GSPO): one ratio per sequence,
    exp(sum_t M (logps - old) / max(sum_t M, 1)), the geometric mean of its token ratios, with
    gradient to every token. Mirrors TRL `importance_sampling_level`. The log-ratio is clamped to
    [-20, 20] and zeroed outside the mask, so padded garbage never reaches the sequence mean.
    verl's GSPO writes the same ratio per token as sg[s_i] * pi_t / sg[pi_t] (equal value and
    gradient) and clamps the sequence log-ratio at 10.
    """
    if level not in IS_LEVELS:
        raise ValueError(f"unknown importance_sampling_level {level!r}; choose one of {IS_LEVELS}")
    mask = mask.bool()
    log_ratio = torch.where(mask, logps - old_logps.detach(), 0.0).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    if level == "sequence":
        log_ratio = log_ratio.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
    return torch.exp(log_ratio)


def policy_loss(
    logps: Tensor,
    old_logps: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    loss_type: str = "dapo",
    importance_sampling_level: str = "token",
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    options=None,
    is_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The per-token policy-gradient loss [B, T] of any registered `loss_type`
    (`registry.POLICY_LOSSES`; aggregate it with `aggregate(..., aggregation_of(loss_type))`).
    Mirrors the surrogate part of TRL `_compute_loss`. `options`: the GRPO config the loss reads
    its knobs from; None builds one from the keyword arguments.

    logps [B, T] (with gradient), old_logps [B, T] (None: logps.detach(), one update per batch),
    advantages [B] or [B, T], mask [B, T]. The ratio is `importance_ratio` at
    `importance_sampling_level`; then `ppo_clip` (grpo, bnpo, dapo, dr_grpo), `cispo_surrogate`
    or `sapo_surrogate`, or any other registered loss. info: the clip booleans and `ratio`, all
    broadcast to [B, T]. A loss registered with `reads_batch=True` (vespo) also gets
    `batch=SimpleNamespace(mask, old_logps, is_weights)`; `is_weights` are the sampler correction's
    weights, which such a loss applies itself when it is registered with `own_is_weights=True`.
    """
    if loss_type not in POLICY_LOSSES:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {POLICY_LOSSES.names()}")
    if options is None:
        options = SimpleNamespace(epsilon_low=epsilon_low, epsilon_high=epsilon_high,
                                  sapo_temperature_pos=sapo_temperature_pos, sapo_temperature_neg=sapo_temperature_neg)
    old_logps = logps.detach() if old_logps is None else old_logps
    ratio = importance_ratio(logps, old_logps, mask, importance_sampling_level)
    extra = {}
    if POLICY_LOSSES.meta(loss_type, "reads_batch", False):
        extra["batch"] = SimpleNamespace(mask=mask, old_logps=old_logps, is_weights=is_weights)
    loss, info = POLICY_LOSSES.get(loss_type)(logps, ratio, advantages, options, **extra)
    info = {k: v.expand(mask.shape) for k, v in {**info, "ratio": ratio.detach()}.items()}
    return loss.expand(mask.shape), info


def clipped_policy_loss(logps: Tensor, ratio: Tensor, advantages: Tensor, options) -> tuple[Tensor, dict]:
    """Registered as grpo, bnpo, dapo, dr_grpo: `ppo_clip` with options.epsilon_low/high and,
    where the options have them, delta and clip_ratio_c."""
    return ppo_clip(ratio, advantages, options.epsilon_low, options.epsilon_high,
                    getattr(options, "delta", None), getattr(options, "clip_ratio_c", None))


def cispo_policy_loss(logps: Tensor, ratio: Tensor, advantages: Tensor, options) -> tuple[Tensor, dict]:
    """Registered as cispo: `cispo_surrogate` capped at options.epsilon_high."""
    return cispo_surrogate(logps, ratio, advantages, options.epsilon_high)


def sapo_policy_loss(logps: Tensor, ratio: Tensor, advantages: Tensor, options) -> tuple[Tensor, dict]:
    """Registered as sapo: `sapo_surrogate` with options.sapo_temperature_pos/neg."""
    return sapo_surrogate(ratio, advantages, options.sapo_temperature_pos, options.sapo_temperature_neg)


def vespo_policy_loss(logps: Tensor, ratio: Tensor, advantages: Tensor, options, batch) -> tuple[Tensor, dict]:
    """Registered as vespo (TRL `loss_type="vespo"`): loss = -phi(w) A logps, with phi the detached
    `vespo_gamma_weights` of the sequence ratio from batch.old_logps and the sampler weights
    (options.vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg). Its gradient is
    phi A grad log pi: no hard clip, so the clip booleans are all False."""
    phi = vespo_gamma_weights(advantages, logps.detach() - batch.old_logps.detach(), batch.mask, batch.is_weights,
                              options.vespo_k_pos, options.vespo_lambda_pos, options.vespo_k_neg,
                              options.vespo_lambda_neg)
    loss = -phi * _per_token_advantages(advantages, logps) * logps
    none = torch.zeros(loss.shape, dtype=torch.bool, device=loss.device)
    return loss, _clip_info(none, none)


def off_policy_mask(advantages: Tensor, logps: Tensor, sampling_logps: Tensor, mask: Tensor,
                    threshold: float) -> Tensor:
    """TRL `off_policy_mask_threshold` (DeepSeek-V3.2's off-policy sequence masking): [B, 1], 0 for
    a completion with a negative advantage whose mean per-token log-ratio of sampler over current
    policy, sum_t M (sampling - sg[logp]) / max(sum_t M, 1), exceeds `threshold`; 1 otherwise.
    advantages [B]; logps, sampling_logps, mask [B, T]."""
    seq_kl = ((sampling_logps - logps.detach()) * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1.0)
    keep = (advantages.view(-1, 1) >= 0) | (seq_kl <= threshold)
    return keep.to(mask.dtype)


def high_entropy_mask(entropy: Tensor, mask: Tensor, top_quantile: float) -> Tensor:
    """TRL `top_entropy_quantile`: True on the completion tokens whose entropy is at least the
    (1 - top_quantile) quantile (torch.quantile, linear interpolation) of the valid tokens'
    entropies; entropy, mask [B, T] -> bool [B, T]. TRL `get_high_entropy_mask`; here over the
    tokens given (one micro-batch of one process), where TRL gathers every process's micro-batch."""
    valid = entropy[mask.bool()].float()
    if valid.numel() == 0:
        return torch.zeros_like(mask, dtype=torch.bool)
    threshold = torch.quantile(valid, 1.0 - top_quantile)
    return (entropy * mask >= threshold) & mask.bool()


def aggregation_of(loss_type: str) -> str:
    """The `aggregate` normaliser of a policy loss_type (its registered `aggregation`): TRL's
    `cispo` divides as `dapo` (tokens of the whole batch), `sapo` as `grpo` (mean of per-sequence
    means); the others are their own."""
    return POLICY_LOSSES.meta(loss_type, "aggregation", loss_type)


def sampler_importance_weights(
    old_logps: Tensor,
    sampler_logps: Tensor,
    mask: Tensor,
    mode: str = "sequence_mask",
    clip_min: float | None = None,
    clip_max: float | None = 3.0,
) -> Tensor:
    """Importance weights for the sampler/trainer mismatch (a vLLM sampler scores tokens slightly
    differently from the trainer). Mirrors TRL `vllm_importance_sampling_mode` (default
    `sequence_mask`, clip_max 3.0, clip_min None).

    old_logps: the trainer's log-probs of the rollout before any update; sampler_logps: the
    sampler's, both [B, T]; mask [B, T]. verl's counterpart is token-level truncation only
    (`tis_imp_ratio_cap`). d = M (old - sampler); token modes: w = exp(d) [B, T];
    sequence modes: w = exp(sum_t d) [B, 1] (a sum, as TRL: the sequence's probability ratio).
    `*_truncate`: w clamped to [clip_min, clip_max] (None = unbounded); `*_mask`: w outside that
    range set to 0. The per-token policy loss is multiplied by w (before the KL term is added).
    """
    if mode not in SAMPLER_IS_MODES:
        raise ValueError(f"unknown vllm_importance_sampling_mode {mode!r}; choose one of {SAMPLER_IS_MODES}")
    diff = torch.where(mask.bool(), old_logps.detach() - sampler_logps.detach(), 0.0)
    if mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True)
    weights = torch.exp(diff.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    if mode.endswith("truncate"):
        return weights if clip_min is None and clip_max is None else weights.clamp(min=clip_min, max=clip_max)
    low = -math.inf if clip_min is None else clip_min
    high = math.inf if clip_max is None else clip_max
    return torch.where((weights < low) | (weights > high), 0.0, weights)


def kl_k3(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """k3 estimator of KL(pi || pi_ref) per token: exp(ref - logp) - (ref - logp) - 1. [B, T] -> [B, T].

    Mirrors TRL (beta > 0 branch). The reference is a constant (detached); the log-ratio is
    clamped to [-20, 20] as verl does, so padded garbage stays finite.
    """
    delta = (ref_logps.detach() - logps).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.exp(delta) - delta - 1.0


def kl_estimate(logps: Tensor, ref_logps: Tensor, estimator: str = "k3") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from sampled tokens, by `grpo.kl_estimator`
    (J. Schulman's k1/k2/k3; names as verl's `kl_penalty`). With d = logp - ref (log-ratio
    clamped to [-20, 20]):
      k3          exp(-d) + d - 1                   TRL's (`kl_k3`), the default
      low_var_kl  k3 clamped to [-10, 10]          verl's `k3` / `low_var_kl`
      k1          d                                 verl's `kl` / `k1`
      abs         |d|
      k2          d^2 / 2                           verl's `mse` / `k2`
    A trailing `+` (k1+, k3+, low_var_kl+) keeps the value and takes k2's gradient (verl's
    straight-through: k2's expected gradient is KL's). [B, T] -> [B, T]; the reference is detached.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown kl_estimator {estimator!r}; choose one of {KL_ESTIMATORS}")
    base = estimator.rstrip("+")
    d = (logps - ref_logps.detach()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    if base == "k1":
        value = d
    elif base == "abs":
        value = d.abs()
    elif base == "k2":
        value = 0.5 * d.square()
    else:
        value = kl_k3(logps, ref_logps)
        if base == "low_var_kl":
            value = value.clamp(-10.0, 10.0)
    if not estimator.endswith("+"):
        return value
    through = 0.5 * (logps - ref_logps.detach()).square()  # unclamped, as verl
    return through - through.detach() + value.detach()


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


# --------------------------------------------------------------------------- divergences


def _degenerate_beta(beta: float) -> bool:
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"JSD beta must lie in [0, 1], got {beta}")
    return beta == 0.0 or beta == 1.0


def _zeros_like_rows(x: Tensor) -> Tensor:
    # A zero that backward() accepts even when it is the whole loss.
    return _upcast(x).new_zeros(x.shape[:-1]).requires_grad_(x.requires_grad)


def _kl_from_logps(log_a: Tensor, log_b: Tensor) -> Tensor:
    """sum_v a (log a - log b) over the last dim, with 0 log 0 = 0 and zero gradient there."""
    a = log_a.exp()
    # where on the difference (not on the product) keeps -inf - -inf out of the backward pass.
    diff = torch.where(a > 0, log_a - log_b, 0.0)
    return (a * diff).sum(-1)


def _finite_log_softmax(logits: Tensor, temperature: float) -> Tensor:
    logp = F.log_softmax(_upcast(logits) / temperature, dim=-1)
    # -inf (masked vocabulary) becomes the most negative float: logaddexp of two -inf has a NaN
    # gradient, and no finite log-prob is changed (its probability underflows to 0 long before).
    return logp.clamp(min=torch.finfo(logp.dtype).min)


def jsd(p_logits: Tensor, q_logits: Tensor, beta: float = 0.5, temperature: float = 1.0) -> Tensor:
    """Generalised Jensen-Shannon divergence in nats, per position. [..., V] x2 -> [...].

    P = softmax(p_logits / temperature) is the teacher, Q = softmax(q_logits / temperature) the
    student; M = beta P + (1 - beta) Q and
        JSD_beta = beta KL(P || M) + (1 - beta) KL(Q || M),
    computed in log space: log M = logaddexp(log beta + log P, log(1 - beta) + log Q).
    Mirrors TRL `GKDTrainer.generalized_jsd_loss` (same M), except beta in {0, 1} returns 0 (the
    continuous limit; TRL switches to a plain KL there). beta = 0.5 is symmetric and <= ln 2.
    Gradients flow to both inputs: detach the teacher at the call site (as `chunked_lens_jsd`
    does). 16-bit inputs are computed in float32. Rounding negatives are clamped to 0.
    """
    if _degenerate_beta(beta):
        return _zeros_like_rows(q_logits)
    logp, logq = (
        _finite_log_softmax(p_logits, temperature),
        _finite_log_softmax(q_logits, temperature),
    )
    log_m = torch.logaddexp(logp + math.log(beta), logq + math.log1p(-beta))
    div = beta * _kl_from_logps(logp, log_m) + (1.0 - beta) * _kl_from_logps(logq, log_m)
    # Rounding in log M leaves ~1e-8 of either sign when P == Q; JSD >= 0, and a negative value
    # would flip the push/pull meaning of signed weighting.
    return div.clamp(min=0.0)


def kl_from_logits(p_logits: Tensor, q_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(P || Q) in nats per position, P = softmax(p_logits / T), Q = softmax(q_logits / T).

    [..., V] x2 -> [...]. Used for the per-layer KL(p_L || p_k) metric (docs/oisd-method.md, section 4).
    """
    logp = F.log_softmax(_upcast(p_logits) / temperature, dim=-1)
    logq = F.log_softmax(_upcast(q_logits) / temperature, dim=-1)
    return _kl_from_logps(logp, logq)



def lens_divergences(teacher_logp: Tensor, student_logits: Tensor, teacher_p: Tensor | None = None
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """KL(P || Q), JSD(P, Q) (beta = 0.5) and H(Q) in nats per row, from one log-softmax of the student.

    teacher_logp [..., V]: log P, already log-softmaxed (computed once and shared by every student);
    teacher_p: its exp, optional, for the same reason; student_logits [..., V] -> three [...] tensors.
    With log Q = log_softmax(student_logits) (temperature 1) and S = P + Q:
        KL  = sum_v P (log P - log Q)                                    (`kl_from_logits`)
        JSD = ln 2 + 1/2 sum_v [P (log P - log S) + Q (log Q - log S)]   (`jsd`, beta = 0.5, >= 0)
        H   = -sum_v Q log Q                                             (`entropy_from_logits`)
    (log M = log S - ln 2 with sum P = sum Q = 1.) log S from the probabilities is finite wherever
    P or Q is positive, so every NaN term is a 0 log 0 (zero probability, -inf or underflowed logit)
    and is summed as 0; KL stays +inf where P > 0 = Q, as `kl_from_logits`. float32 or wider;
    no gradient (metrics: call under `torch.no_grad()`); temporaries are reused in place.
    """
    logq = F.log_softmax(_upcast(student_logits), dim=-1)
    p = teacher_logp.exp() if teacher_p is None else teacher_p
    q = logq.exp()
    buf = torch.mul(q, logq)
    entropy = -buf.nansum(-1)
    kl = torch.sub(teacher_logp, logq, out=buf).mul_(p).nansum(-1)
    log_s = torch.add(p, q).log_()
    # Two sums, not one of the added terms: a 0 log 0 of P must not hide Q's term at that entry.
    p_terms = torch.sub(teacher_logp, log_s, out=buf).mul_(p).nansum(-1)
    div = logq.sub_(log_s).mul_(q).nansum(-1).add_(p_terms).mul_(0.5).add_(math.log(2.0))
    # Rounding leaves ~1e-7 of either sign when P == Q; JSD >= 0 (as `jsd` clamps).
    return kl, div.clamp_(min=0.0), entropy

LENS_CHECKPOINT_MIN_ELEMENTS = 1 << 26
"""Tokens x vocabulary of the lens above which its chunks are recomputed in backward. Below it,
each chunk keeps one [chunk, V] float32 tensor (its student-logit gradient, at most 256 MiB in
all) and nothing is recomputed; above it, at most one chunk's [chunk, V] tensors are alive."""


class _StudentJSD(torch.autograd.Function):
    """JSD_beta(P || Q) per row (as `jsd`), whose gradient w.r.t. the student logits is formed in
    the forward pass, in closed form, instead of by autograd through a dozen [n, V] ops.

    With Q = softmax(q / T) and M = beta P + (1 - beta) Q, d JSD / d Q_v = (1 - beta) log(Q_v / M_v)
    (the log terms of P and Q through M cancel against the +1), so through the softmax
        d JSD / d q_v = (1 - beta) / T * Q_v * (log(Q_v / M_v) - KL(Q || M)).
    It is zeroed where `jsd` clamps a rounding negative to 0 (clamp passes gradient at >= 0).
    Saves that one [n, V] gradient; backward scales it by the upstream gradient.
    """

    @staticmethod
    def forward(ctx, teacher: Tensor, student: Tensor, beta: float, temperature: float) -> Tensor:
        logp, logq = _log_softmax_at(teacher, temperature), _log_softmax_at(student, temperature)
        p, q = logp.exp(), logq.exp()
        # log M from the probabilities (one log instead of logaddexp). Terms of probability 0
        # (-inf logits, or M underflowing next to a denormal) come out as NaN or inf and are 0.
        log_m = torch.add(p, q, alpha=(1.0 - beta) / beta).mul_(beta).log_()
        kl_p = _zero_nonfinite(logp.sub_(log_m).mul_(p)).sum(-1)
        q_ratio = logq.sub_(log_m)  # log(Q / M)
        kl_q = _zero_nonfinite(q * q_ratio).sum(-1)
        raw = beta * kl_p + (1.0 - beta) * kl_q
        if ctx.needs_input_grad[1]:
            scale = ((1.0 - beta) / temperature) * (raw >= 0).to(q.dtype)  # [n]
            grad = _zero_nonfinite(q.mul_(q_ratio.sub_(kl_q[:, None]))).mul_(scale[:, None])
            ctx.save_for_backward(grad)
            ctx.student_dtype = student.dtype
        return raw.clamp(min=0.0)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        (grad,) = ctx.saved_tensors
        return None, (grad * grad_out[:, None]).to(ctx.student_dtype), None, None


def _log_softmax_at(logits: Tensor, temperature: float) -> Tensor:
    z = _upcast(logits)
    return F.log_softmax(z / temperature if temperature != 1.0 else z, dim=-1)


def _zero_nonfinite(x: Tensor) -> Tensor:
    """In place: NaN and +-inf -> 0 (the terms of `_StudentJSD` whose probability is 0)."""
    return x.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)


def _lens_jsd_rows(teacher: Tensor, student: Tensor, beta: float, temperature: float) -> Tensor:
    """`jsd(teacher.detach(), student)` for [n, V] rows: the closed-form gradient when it applies."""
    if _degenerate_beta(beta) or student.dim() != 2:
        return jsd(teacher.detach(), student, beta=beta, temperature=temperature)
    return _StudentJSD.apply(teacher.detach(), student, beta, float(temperature))


def chunked_lens_jsd(
    student_hidden: Tensor,
    teacher_logits: Tensor,
    readout: Callable[[Tensor], Tensor],
    beta: float = 0.5,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    teacher_index: tuple[Tensor, ...] | None = None,
) -> Tensor:
    """OISD logit alignment d_t = JSD_beta(sg[p_L] || softmax(readout(h_l))) per token, chunked.

    student_hidden [N, D]: completion-token hidden states of the student layer (NOT final-normed);
    teacher_logits [N, V]: final-layer logits at the same tokens (detached here), or [..., V]
    with `teacher_index`;
    readout: [n, D] -> [n, V], the model's final norm + unembedding (the logit lens; pass a
    readout with detached weights for lens_grad="hidden_only"). Returns [N] with gradient to
    student_hidden and to readout's parameters. Values and gradients are those of `jsd` on the
    whole [N, V] (the gradient w.r.t. the student logits in closed form, see `_StudentJSD`).
    teacher_index: when given, the teacher rows are `teacher_logits[teacher_index]` (e.g. the
    boolean mask's `nonzero(as_tuple=True)` over [B, T, V] logits), gathered one chunk at a time
    inside the checkpointed function, so no [N, V] copy of the teacher is ever made.
    Above `LENS_CHECKPOINT_MIN_ELEMENTS` of [N, V] work, each chunk of `chunk_size` tokens runs
    under non-reentrant activation checkpointing, so at most one [chunk, V] block of student
    logits is alive in forward and in backward; below it nothing is recomputed.
    """
    teacher_logits = teacher_logits.detach()
    if teacher_index is None:
        teacher_index = (torch.arange(teacher_logits.shape[0], device=teacher_logits.device),)
    if student_hidden.shape[0] != teacher_index[0].shape[0]:
        raise ValueError(
            f"student_hidden has {student_hidden.shape[0]} tokens, teacher_logits {teacher_index[0].shape[0]}"
        )

    def lens_chunk(h: Tensor, *index: Tensor) -> Tensor:
        return _lens_jsd_rows(teacher_logits[index], readout(h), beta, temperature)

    use_ckpt = torch.is_grad_enabled() and student_hidden.shape[0] * teacher_logits.shape[-1] > \
        LENS_CHECKPOINT_MIN_ELEMENTS
    pieces = [
        checkpoint(lens_chunk, h, *index, use_reentrant=False)
        if use_ckpt
        else lens_chunk(h, *index)
        for h, *index in zip(
            student_hidden.split(chunk_size), *(i.split(chunk_size) for i in teacher_index), strict=True
        )
    ]
    if not pieces:
        return _zeros_like_rows(student_hidden)
    return torch.cat(pieces)


class HeadOutputs(NamedTuple):
    """What `chunked_head` returns, one entry per selected token: log-probs [N] (with gradient
    when the policy's inputs have one), the entropy [N] of the final distribution (detached; None
    when not asked for) and one lens JSD [N] per student (with gradient to the student)."""

    logps: Tensor
    entropy: Tensor | None
    lens_jsd: tuple[Tensor, ...]


def chunked_head(
    final_hidden: Tensor,
    tokens: Tensor,
    head: Callable[[Tensor], Tensor],
    vocab: int,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    students: tuple[tuple[Tensor, Callable[[Tensor], Tensor]], ...] = (),
    jsd_beta: float = 0.5,
    jsd_temperature: float = 1.0,
    policy: tuple[Tensor, Callable[[Tensor], Tensor]] | None = None,
    entropy: bool = True,
    entropy_grad: bool = False,
) -> HeadOutputs:
    """Everything the step needs from the vocabulary, straight from hidden states, chunk by chunk.

    final_hidden [N, D]: the final-normed hidden states at N selected tokens; tokens [N]: the token
    each position predicts; head: [n, D] -> [n, V], the unembedding and the model's logit
    post-processing (so head(final_hidden) are the model's logits).
    Per chunk of `chunk_size` rows, the final logits are formed once and give
      logps   = log softmax(logits / temperature)[tokens]            (`token_logps`)
      entropy = H(softmax(logits / temperature)), detached           (`entropy_from_logits`)
      lens_jsd[i] = JSD_beta(sg[p_L] || softmax(readout_i(h_i)))     (`chunked_lens_jsd`)
    for each student (h_i [N, D], readout_i) in `students`: the teacher of the logit channel is
    the policy's own chunk, not a second pass. `policy` = (h [N, D], readout) reads the log-probs
    from that readout instead (an internal policy); the final logits are then formed without a
    graph, as teacher and for the entropy only. `entropy_grad`: the entropy keeps its gradient
    (an entropy bonus in the loss; final-layer policy only).

    No [N, V] tensor is kept: above `LENS_CHECKPOINT_MIN_ELEMENTS` of N x `vocab` work with a
    gradient, each chunk runs under non-reentrant activation checkpointing, so backward recomputes
    one chunk's logits at a time (one more unembedding forward per chunk); below it, each chunk
    keeps its own graph and nothing is recomputed. Values and gradients are those of the plain
    functions on whole [N, V] logits, to float32 rounding.
    """
    student_h = tuple(h for h, _ in students)
    readouts = tuple(r for _, r in students)
    extra = (policy[0],) if policy is not None else ()

    entropies: dict[int, Tensor] = {}

    if entropy_grad and (policy is not None or not entropy):
        raise ValueError("entropy_grad needs entropy=True and the final layer as the policy")

    def run(i: int, h: Tensor, tok: Tensor, *hs: Tensor) -> tuple[Tensor, ...]:
        with torch.set_grad_enabled(torch.is_grad_enabled() and policy is None):
            logits = head(h)
        if policy is None:
            logps = _chunked_logps(logits, tok, max(1, tok.shape[0]), float(temperature))
        else:
            logps = _chunked_logps(policy[1](hs[-1]), tok, max(1, tok.shape[0]), float(temperature))
        teacher = logits.detach()
        out = [logps]
        if entropy_grad:  # with its graph: recomputed with the chunk like the log-probs
            out.append(entropy_from_logits(logits, chunk_size=max(1, tok.shape[0]), temperature=temperature))
        elif entropy and i not in entropies:  # once: not again when backward recomputes the chunk
            with torch.no_grad():
                entropies[i] = entropy_from_logits(teacher, chunk_size=max(1, tok.shape[0]), temperature=temperature)
        return (*out, *(_lens_jsd_rows(teacher, readout(hi), jsd_beta, jsd_temperature)
                        for hi, readout in zip(hs[: len(readouts)], readouts, strict=True)))

    inputs = (final_hidden, *student_h, *extra)
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in inputs)
    use_ckpt = grad and final_hidden.shape[0] * vocab > LENS_CHECKPOINT_MIN_ELEMENTS
    splits = [x.split(chunk_size) for x in (final_hidden, tokens, *student_h, *extra)]
    pieces = [checkpoint(run, i, *chunk, use_reentrant=False) if use_ckpt else run(i, *chunk)
              for i, chunk in enumerate(zip(*splits, strict=True))]
    if not pieces:
        empty = _upcast(final_hidden).new_zeros(0)
        return HeadOutputs(empty, empty if entropy else None, tuple(empty for _ in students))
    columns = [torch.cat(col) for col in zip(*pieces, strict=True)]
    if entropy_grad:
        return HeadOutputs(columns[0], columns[1], tuple(columns[2:]))
    ent = torch.cat([entropies[i] for i in range(len(pieces))]) if entropy else None
    return HeadOutputs(columns[0], ent, tuple(columns[1:]))


# --------------------------------------------------------------------------- attention


def _attention_rows(
    attn: Tensor, key_mask: Tensor | None, exclude_sink: bool, eps: float
) -> tuple[Tensor, Tensor]:
    """Zero dropped keys and renormalise rows. attn [B, h, T, S] -> (rows [B, h, T, S], ok [B, h, T]).

    The sink is the first real key of each row: prompts are left-padded, so on shorter rows key 0
    is padding and the sink sits further right (key 0 when there is no key_mask)."""
    keep = torch.ones(attn.shape[-1], dtype=torch.bool, device=attn.device)
    if key_mask is not None:
        keep = key_mask.bool()  # [B, S]
    if exclude_sink:
        first = keep.int().argmax(-1, keepdim=True) if keep.dim() == 2 else 0  # [B, 1]: first True
        keep = keep & (torch.arange(attn.shape[-1], device=attn.device) != first)
    if keep.dim() == 2:
        keep = keep[:, None, None, :]  # [B, S] -> [B, 1, 1, S]
    rows = torch.where(keep, attn, 0.0)
    mass = rows.sum(-1, keepdim=True)
    ok = mass > eps
    # Renormalising also absorbs bf16 rounding of rows that were already distributions.
    rows = torch.where(ok, rows / torch.where(ok, mass, 1.0), 0.0)
    return rows, ok.squeeze(-1)


def _xlog_ratio(a: Tensor, b: Tensor) -> Tensor:
    """sum_s a log(a / b) over the last dim for probabilities, 0 log 0 = 0 with finite gradients."""
    pos = a > 0
    # Both logs see 1 where a == 0 so that neither value nor gradient can become NaN.
    safe_a, safe_b = torch.where(pos, a, 1.0), torch.where(pos, b, 1.0)
    return torch.where(pos, a * (safe_a.log() - safe_b.log()), 0.0).sum(-1)


def _prob_jsd(p: Tensor, q: Tensor, beta: float) -> Tensor:
    m = beta * p + (1.0 - beta) * q  # positive wherever p or q is, since 0 < beta < 1
    return (beta * _xlog_ratio(p, m) + (1.0 - beta) * _xlog_ratio(q, m)).clamp(
        min=0.0
    )  # as in `jsd`


def attention_row_jsd(
    teacher_attn: Tensor,
    student_attn: Tensor,
    query_mask: Tensor,
    key_mask: Tensor | None = None,
    head_reduce: str = "mean",
    exclude_sink: bool = False,
    beta: float = 0.5,
    eps: float = 1e-12,
    head_agg: str = "mean",
) -> Tensor:
    """OISD attention alignment: JSD_beta(sg[a_L(t, :)] || a_l(t, :)) per query row. -> [B, T].

    teacher_attn, student_attn: [B, H, T, S] post-softmax probabilities (rows over keys; the
    teacher is detached here). query_mask [B, T] bool: rows outside it give 0. key_mask [B, S]
    bool (False = padding): those keys are zeroed and rows renormalised. exclude_sink drops the
    first real key of each row (the attention sink: key 0 only on unpadded rows) and renormalises;
    a row with no remaining mass (<= eps) gives 0.
    head_reduce `mean`: average the H rows, then one JSD per row (the paper's default reading);
    `per_head`: JSD of student head i against teacher head i; `per_head_to_mean`: JSD of each
    student head against the teacher's head mean (pairing head i with head i across layers is
    arbitrary). Joint convexity of JSD makes the head mean of `per_head` >= `mean` when the heads
    of each side keep equal mass after key_mask and exclude_sink (renormalising then commutes with
    the head mean): always without exclude_sink on a real layer's rows, whose padding keys hold no
    mass. exclude_sink renormalises each head by its own non-sink mass, and `per_head` can then
    fall below `mean`.
    head_agg: `mean` or `sum` of the per-head JSDs (sum = H x mean; one row under `mean`).
    Computed on probabilities with 0 log 0 = 0; beta in {0, 1} gives 0, as in `jsd`.
    """
    if head_reduce not in HEAD_REDUCE:
        raise ValueError(f"unknown head_reduce {head_reduce!r}; choose one of {HEAD_REDUCE}")
    if head_agg not in HEAD_AGG:
        raise ValueError(f"unknown head_agg {head_agg!r}; choose one of {HEAD_AGG}")
    query_mask = query_mask.bool()
    if _degenerate_beta(beta):
        return torch.zeros(query_mask.shape, device=query_mask.device).requires_grad_(
            student_attn.requires_grad
        )
    teacher, student = _upcast(teacher_attn.detach()), _upcast(student_attn)
    if head_reduce != "per_head":
        teacher = teacher.mean(1, keepdim=True)  # [B, 1, T, S], broadcast against student heads
    if head_reduce == "mean":
        student = student.mean(1, keepdim=True)
    teacher, teacher_ok = _attention_rows(teacher, key_mask, exclude_sink, eps)
    student, student_ok = _attention_rows(student, key_mask, exclude_sink, eps)
    div = torch.where(teacher_ok & student_ok, _prob_jsd(teacher, student, beta), 0.0)  # [B, h, T]
    div = div.sum(1) if head_agg == "sum" else div.mean(1)
    return torch.where(query_mask, div, 0.0)


def attention_cosine(
    teacher_attn: Tensor,
    student_attn: Tensor,
    query_mask: Tensor,
    key_mask: Tensor | None = None,
    exclude_sink: bool = False,
    eps: float = 1e-12,
) -> Tensor:
    """Cosine similarity of head-mean attention rows (a diagnostic). [B, H, T, S] x2 -> [B, T].

    Keys dropped by key_mask / exclude_sink are zeroed (cosine ignores renormalisation);
    rows outside query_mask, or with no remaining mass, give 0.
    """
    teacher = _upcast(teacher_attn.detach()).mean(1, keepdim=True)  # [B, 1, T, S]
    student = _upcast(student_attn).mean(1, keepdim=True)
    teacher, _ = _attention_rows(teacher, key_mask, exclude_sink, eps)
    student, _ = _attention_rows(student, key_mask, exclude_sink, eps)
    dot = (teacher * student).sum(-1)
    norms = (teacher.norm(dim=-1) * student.norm(dim=-1)).clamp(min=eps)
    return torch.where(query_mask.bool(), (dot / norms).squeeze(1), 0.0)


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
