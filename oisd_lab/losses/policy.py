"""The GRPO side of the loss: advantages (group-normalised, RLOO, REINFORCE++ and GDPO's
normalise-then-sum) and their alignment weights, the importance ratio, the policy surrogates
(clipped PPO, CISPO, SAPO, VESPO) behind `policy_loss`, the masks that drop tokens from it, the
sampler correction's weights and the KL estimators. Part of `oisd_lab.losses`; the conventions
against TRL and verl are in docs/grpo-conventions.md."""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
from torch import Tensor

from ..options import IS_LEVELS, KL_ESTIMATORS, SAMPLER_IS_MODES, SCALE_REWARDS, WEIGHTINGS
from ..registry import ADVANTAGE_ESTIMATORS, POLICY_LOSSES
from .numerics import LOG_RATIO_CLAMP

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
