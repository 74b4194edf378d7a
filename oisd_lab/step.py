"""One training step's objective as two public functions: the policy forward, then the loss terms.

    policy_forward(model, part, hidden_layers, attn_layers) -> PolicyOutputs
    loss_terms(outputs, part, norm, objective)                -> {"loss/policy", "loss/think", ...}

Positions: the logits at position t predict token t+1, so every quantity of a completion token t
is read at sequence position P-1+t (P = prompt length): `completion_positions`. Hidden-state
index k (0 = embeddings, L = final, already final-normed) is the output of the decoder layer whose
attention module has `layer_idx == k - 1` (`attention.attention_layer_of`). Both mappings live
here and in `attention.py` only; the module, the diagnostics, the tests and the benchmarks call
these functions instead of re-deriving them.

The math is in `losses/`; this module only decides which tensors go where.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from . import losses
from . import shared_prompt as shared
from .attention import AttentionCapture, attention_layer_of
from .lens import Readout, find_readout
from .options import JSD_TEMPERATURE_SAMPLING
from .registry import ALIGNMENT_CHANNELS, POLICY_LOSSES, channel_weight, channel_weighting
from .rollout import Rollout

VOCAB_CHUNK_ELEMENTS = 1 << 24
"""Rows x vocabulary of one block of vocabulary-sized work (64 MiB in float32): the log-probs,
the entropy and the lens chunks (there also capped by `method.chunk_size` tokens), so that a
150k vocabulary stays within a few such blocks and a tiny one runs in a single block."""

ATTN_ROW_BLOCK = 64
"""Completion rows per block of the attention alignment (each block reads only the keys it can see)."""


def completion_positions(part: Rollout) -> slice:
    """Sequence positions whose outputs predict the completion tokens: P-1 .. P-2+C."""
    P, C = part.prompt_length, part.completion_mask.shape[1]
    return slice(P - 1, P - 1 + C)


@dataclass
class PolicyOutputs:
    """The policy's forward at the C positions that predict completion tokens.

    final: [b, C, D], the final-normed hidden states (the model's logits are `readout` of them;
    the step never forms them whole, see `head`). hidden: hidden-state index k -> [b, C, D] (only
    the requested k; k = L is the final-normed last entry). attention: the capture of the
    requested layers' attention, read with `attention_rows`; None when no layer was requested.
    """

    final: torch.Tensor
    hidden: Mapping[int, torch.Tensor]
    attention: AttentionCapture | None
    positions: slice
    readout: Readout

    @property
    def logits(self) -> torch.Tensor:
        """The model's logits [b, C, V], formed whole: for inspection and tests; the loss reads
        them chunk by chunk through `head` instead."""
        return self.readout.logits(self.final, self.readout.num_layers)

    def head(self, mask: torch.Tensor, tokens: torch.Tensor, temperature: float, chunk_size: int,
             **kwargs) -> losses.HeadOutputs:
        """`losses.chunked_head` at the completion tokens where `mask` [b, C] is set (N of them):
        log-probs of `tokens` [b, C] there, and whatever `kwargs` asks for."""
        sel = mask.bool()
        final = self.readout.for_layer(self.readout.num_layers)
        return losses.chunked_head(self.final[sel], tokens[sel], final, self.vocab, temperature,
                                   chunk_size, **kwargs)

    @property
    def vocab(self) -> int:
        return self.readout.unembed.weight.shape[0]

    def attention_rows(self, k: int, lo: int = 0, hi: int | None = None, keys: int | None = None
                       ) -> torch.Tensor:
        """Attention probabilities [b, H, hi-lo, S] of the layer that outputs hidden_states[k], for
        completion rows lo..hi-1 (S = `keys` first keys, or all). Recomputed from captured q/k."""
        if self.attention is None:
            raise KeyError(f"no attention was captured; pass attn_layers=[{k}, ...] to policy_forward")
        start = self.positions.start
        stop = self.positions.stop if hi is None else start + hi
        return self.attention.probs_for(attention_layer_of(k), slice(start + lo, stop), keys=keys)


def policy_forward(model, part: Rollout, hidden_layers: Sequence[int] = (),
                   attn_layers: Sequence[int] = (), readout: Readout | None = None,
                   shared_prompt: bool = False) -> PolicyOutputs:
    """Run the policy once on `part` (a Rollout on the model's device).

    hidden_layers / attn_layers: hidden-state indices k whose hidden states / attention rows the
    caller will read. No position reaches the model's own unembedding (`logits_to_keep` is
    empty): the loss reads the vocabulary chunk by chunk from the final hidden states
    (`PolicyOutputs.head`), so no [b, C, V] tensor is made. readout: the model's
    (`lens.find_readout`, looked up when not given). shared_prompt: compute a prompt that several
    rows share once (`shared_prompt.shared_prompt_forward`; the whole rows where it does not
    apply). Gradient mode is the caller's.
    """
    pos = completion_positions(part)
    capture = sorted({attention_layer_of(k) for k in attn_layers})
    ctx = AttentionCapture(model, capture) if capture else contextlib.nullcontext()
    keep = torch.empty(0, dtype=torch.long, device=part.input_ids.device)
    groups = shared.groups_of(part.input_ids, part.attention_mask, pos.start) \
        if shared_prompt and shared.applies(model) else None
    with ctx as cap:
        if groups is None:
            out = model(input_ids=part.input_ids, attention_mask=part.attention_mask,
                        output_hidden_states=True, logits_to_keep=keep, use_cache=False)
        else:  # its outputs start at position P-1: the completion positions are 0 .. C-1
            out = shared.shared_prompt_forward(model, part.input_ids, part.attention_mask, pos.start, groups,
                                               pos.stop - pos.start, output_hidden_states=True, logits_to_keep=keep)
            pos = slice(0, pos.stop - pos.start)
    hidden = {k: out.hidden_states[k][:, pos] for k in hidden_layers}
    readout = readout if readout is not None else find_readout(model)
    return PolicyOutputs(out.hidden_states[-1][:, pos], hidden, cap, pos, readout)


@dataclass(frozen=True)
class Objective:
    """The choices that define one step's loss: GRPO and method configs, the readout, the student
    layers (hidden-state indices) and the model depth L; `align_scale` is this step's value of
    the alignment schedule (`scheduled`)."""

    grpo: object  # config.GRPOConfig
    method: object  # config.MethodConfig
    readout: Readout
    student_layers: tuple[int, ...]
    align_scale: float = 1.0
    policy_layer: int | None = None
    """Hidden-state index whose logit lens is the policy of the policy-gradient loss (BuPO's
    internal policy); None: the final layer, as in GRPO. Sampling always uses the final layer."""
    policy_final_norm: bool = False
    """With policy_layer: apply the final norm before the unembedding (the OISD lens) or not (BuPO)."""
    entropy_coef: float | None = None
    """This step's entropy-bonus coefficient (adaptive entropy control sets it); None:
    grpo.entropy_coef."""

    @property
    def entropy_bonus(self) -> float:
        """The coefficient of the entropy bonus in this step's loss (0 under BuPO's internal policy)."""
        if self.policy_layer is not None:
            return 0.0
        return float(self.grpo.entropy_coef if self.entropy_coef is None else self.entropy_coef)

    @property
    def num_layers(self) -> int:
        return self.readout.num_layers

    @property
    def jsd_temperature(self) -> float:
        """Temperature of the logit channel: `method.jsd_temperature`, or `grpo.temperature` when it
        is the word `sampling` (the only place that word is resolved)."""
        value = self.method.jsd_temperature
        return float(self.grpo.temperature if value == JSD_TEMPERATURE_SAMPLING else value)

    def weight(self, channel: str) -> float:
        """This step's weight of an alignment channel (`registry.ALIGNMENT_CHANNELS`): its
        configured weight x the schedule."""
        return channel_weight(self.method, channel) * self.align_scale

    def channels(self, capture: str | None = None) -> list[str]:
        """The alignment channels with a positive weight this step, in registry order; with
        `capture`, only those that need that capture."""
        return [name for name in ALIGNMENT_CHANNELS.names() if self.weight(name) > 0
                and (capture is None or ALIGNMENT_CHANNELS.meta(name, "capture") == capture)]

    @property
    def logit_weight(self) -> float:
        """This step's weight of L_think: method.logit_weight x the schedule."""
        return self.weight("think")

    @property
    def attn_weight(self) -> float:
        """This step's weight of L_attn: method.attn_weight x the schedule."""
        return self.weight("attn")

    def scheduled(self, step: int) -> Objective:
        """This objective at optimisation step `step` (1-based) of `method.align_schedule`."""
        m = self.method
        scale = losses.alignment_scale(step, m.align_schedule, m.align_schedule_steps)
        return dataclasses.replace(self, align_scale=scale)

    @property
    def hidden_layers(self) -> list[int]:
        """What `policy_forward` must return: the student layers for the channels that read hidden
        states (the logit alignment), and the internal policy's layer."""
        layers = list(self.student_layers) if self.channels("lens") or self.channels("hidden") else []
        if self.policy_layer is not None and self.policy_layer not in layers:
            layers.append(self.policy_layer)
        return layers

    @property
    def attn_layers(self) -> list[int]:
        """What `policy_forward` must capture for the attention alignment (students + final)."""
        return [*self.student_layers, self.num_layers] if self.channels("attention") else []

    def forward(self, model, part: Rollout) -> PolicyOutputs:
        return policy_forward(model, part, self.hidden_layers, self.attn_layers, self.readout,
                              shared_prompt=self.grpo.shared_prompt)

    def head_chunk(self, vocab: int) -> int:
        """Rows per chunk of vocabulary work: `method.chunk_size` tokens, and at most
        `VOCAB_CHUNK_ELEMENTS` elements of [rows, V]."""
        return max(1, min(self.method.chunk_size, VOCAB_CHUNK_ELEMENTS // vocab))

    def policy_head(self, out: PolicyOutputs) -> tuple[torch.Tensor, object] | None:
        """The internal policy's (hidden states [b, C, D], readout) when `policy_layer` is set
        (BuPO), else None (the final layer's logits)."""
        if self.policy_layer is None:
            return None
        # Readout.logits skips the norm for the last hidden-state index (already normed there), so
        # asking for index L applies the unembedding (and logit post-processing) alone: BuPO's lens.
        lens_index = self.policy_layer if self.policy_final_norm else self.num_layers
        return out.hidden[self.policy_layer], self.readout.for_layer(lens_index)

    def students(self, out: PolicyOutputs) -> dict[int, tuple[torch.Tensor, object]]:
        """Per student layer of the logit channel, its (hidden states [b, C, D], lens readout)."""
        m = self.method
        return {k: (out.hidden[k], self.readout.for_layer(k, m.lens_grad, norm=m.lens_norm))
                for k in self.student_layers}

    def head(self, out: PolicyOutputs, part: Rollout, students: bool, entropy: bool, entropy_grad: bool = False
             ) -> tuple[torch.Tensor, torch.Tensor | None, dict[int, torch.Tensor]]:
        """One chunked pass over the vocabulary (`losses.chunked_head`): the policy's per-token
        log-probs [b, C], the final distribution's entropy [b, C] (detached; None unless asked)
        and, with `students`, each student layer's lens JSD {k: [b, C]}; all 0 off the mask."""
        mask = part.completion_mask
        sel = mask.bool()
        pol = self.policy_head(out)
        studs = self.students(out) if students else {}
        res = out.head(mask, part.completion_ids, self.grpo.temperature, self.head_chunk(out.vocab),
                       students=tuple((h[sel], r) for h, r in studs.values()),
                       jsd_beta=self.method.jsd_beta, jsd_temperature=self.jsd_temperature,
                       policy=None if pol is None else (pol[0][sel], pol[1]), entropy=entropy,
                       entropy_grad=entropy_grad)
        ent = on_mask(res.entropy, mask) if res.entropy is not None else None
        return on_mask(res.logps, mask), ent, {k: on_mask(d, mask) for k, d in zip(studs, res.lens_jsd, strict=True)}

    def total(self, terms: Mapping[str, object]):
        """L = L_policy + w_logit L_think + w_attn L_attn (+ any registered channel's weighted
        loss, in registry order), for tensors or logged floats alike."""
        total = terms["loss/policy"]
        for name in ALIGNMENT_CHANNELS.names():
            if f"loss/{name}" in terms:
                total = total + self.weight(name) * terms[f"loss/{name}"]
        return total


def loss_terms(out: PolicyOutputs, part: Rollout, norm: Mapping, objective: Objective,
               ref_logps: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The loss terms of one micro-batch, each aggregated with the policy loss's normaliser (the
    alignment losses with `method.align_loss_type`'s instead when it is set).

    out: `objective.forward(model, part)`; part.advantages [b] (required) and part.rewards [b] (for
    the `reward` weighting); norm: whole-batch normalisers for `losses.aggregate`
    (num_items_in_batch, num_sequences, max_completion_length, and num_micro_batches for `bnpo`);
    ref_logps [b, C] when grpo.beta > 0.
    part.old_logps (the old policy, else the current one detached) and part.is_weights (sampler
    mismatch) enter the policy loss (`losses.policy_loss`, any grpo.loss_type).
    Returns "loss/policy", "loss/<channel>" for each weighted alignment channel
    (`registry.ALIGNMENT_CHANNELS`: "loss/think", "loss/attn"), "loss/total" (with graph),
    detached token sums "sum/<metric>" (entropy, clip ratios, importance ratio, kl), the importance
    ratio's "min/..." and "max/..." for logging, and per-channel
    divergence sums by advantage sign "stat/<channel>/..." (`divergence_sums`).
    """
    g, m, mask = objective.grpo, objective.method, part.completion_mask
    adv, rewards = part.advantages, part.rewards
    if adv is None:
        raise ValueError("loss_terms needs the rollout's advantages (`Rollout.scored`)")
    # one pass over the vocabulary: log-probs, entropy and the lens JSD of every student
    bonus = objective.entropy_bonus != 0  # BuPO's internal policy: no bonus
    logps, ent, lens_jsd = objective.head(out, part, students=bool(objective.channels("lens")), entropy=True,
                                          entropy_grad=bonus)
    per_tok, clip = losses.policy_loss(logps, part.old_logps, adv, mask, g.loss_type, g.importance_sampling_level,
                                       options=g, is_weights=part.is_weights)
    if g.off_policy_mask_threshold is not None:  # TRL's order: this mask, the entropy mask, the IS weights
        per_tok = per_tok * losses.off_policy_mask(adv, logps, sampling_logps(part, logps), mask,
                                                   g.off_policy_mask_threshold)
    if g.top_entropy_quantile < 1.0:  # only the highest-entropy tokens get the policy gradient (TRL)
        per_tok = per_tok * losses.high_entropy_mask(ent, mask, g.top_entropy_quantile)
    if part.is_weights is not None and not POLICY_LOSSES.meta(g.loss_type, "own_is_weights", False):
        # sampler/trainer mismatch, before the KL term as in TRL (vespo puts them inside its weight)
        per_tok = per_tok * part.is_weights
    terms: dict[str, torch.Tensor] = {}
    if g.beta > 0:
        kl = losses.kl_estimate(logps, ref_logps, g.kl_estimator)
        if g.use_bias_correction_kl:  # TRL: the KL of the current policy, from old-policy samples
            kl = kl * losses.importance_ratio(logps, logps.detach() if part.old_logps is None else part.old_logps,
                                              mask, g.importance_sampling_level)
        per_tok = per_tok + g.beta * kl
        terms["sum/kl"] = (kl.detach() * mask).sum()
    if bonus:  # verl's entropy_coeff: minus coef x entropy, aggregated as the policy loss
        per_tok = per_tok - objective.entropy_bonus * ent
    agg = dict(loss_type=losses.aggregation_of(g.loss_type), **norm)
    terms["loss/policy"] = losses.aggregate(per_tok, mask, **agg)
    align = Alignment(mask, adv, rewards, dict(agg, loss_type=m.align_loss_type or agg["loss_type"]))
    shared = {"lens_jsd": lens_jsd}
    for name in objective.channels():
        divergence = ALIGNMENT_CHANNELS.get(name)(out, part, objective, shared)
        terms[f"loss/{name}"] = align.loss(name, divergence, channel_weighting(m, name), terms)
    with torch.no_grad():
        terms["sum/entropy"] = (ent * mask).sum()
        for name in ("low", "high", "region"):
            terms[f"sum/clip_ratio/{name}_mean"] = (clip[f"is_{name}_clipped"].float() * mask).sum()
        terms.update(ratio_terms(clip["ratio"], mask))
    terms["loss/total"] = objective.total(terms)
    return terms


def sampling_logps(part: Rollout, logps: torch.Tensor) -> torch.Tensor:
    """The log-probs of the policy that sampled `part`: the sampler's own (vLLM; a token without
    one reads the old policy's), else the old policy's, else the current policy's, detached."""
    old = part.old_logps if part.old_logps is not None else logps.detach()
    if part.sampler_logps is None:
        return old
    return torch.where(torch.isnan(part.sampler_logps), old, part.sampler_logps)


def ratio_terms(ratio: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Logged importance ratio over completion tokens: "sum/importance_ratio/mean" (a token sum),
    "min/..." and "max/..." (+inf / -inf when the mask is empty, so they combine over micro-batches)."""
    sel = mask.bool()
    inf = torch.tensor(float("inf"), device=ratio.device)
    return {"sum/importance_ratio/mean": (ratio * mask).sum(),
            "min/importance_ratio/min": torch.where(sel, ratio, inf).min() if sel.numel() else inf,
            "max/importance_ratio/max": torch.where(sel, ratio, -inf).max() if sel.numel() else -inf}


@dataclass
class Alignment:
    """How one micro-batch's per-token divergences become an alignment loss: weights from the
    advantages (or rewards), the alignment aggregator `agg` (kwargs of `losses.aggregate`)."""

    mask: torch.Tensor
    adv: torch.Tensor
    rewards: torch.Tensor | None
    agg: dict

    def loss(self, channel: str, divs: Mapping[int, torch.Tensor], weighting: str,
             stats: dict) -> torch.Tensor:
        """Weighted, aggregated loss averaged over student layers; adds the layer-mean
        divergence's sums by advantage sign to `stats` under "stat/<channel>/"."""
        total = sum(losses.alignment_loss(d, self.mask, self.adv, weighting, rewards=self.rewards, **self.agg)
                    for d in divs.values())
        mean_div = sum(d.detach() for d in divs.values()) / len(divs)
        for key, value in losses.divergence_sums(mean_div, self.mask, self.adv).items():
            stats[f"stat/{channel}/{key}"] = value
        return total / len(divs)


def think_divergence(out: PolicyOutputs, part: Rollout, objective: Objective,
                     shared: Mapping | None = None) -> dict[int, torch.Tensor]:
    """Per student layer, the per-token JSD(sg[p_L] || lens p_l): {k: [b, C]}, 0 off the mask.
    (`loss_terms` gets these from the same chunked pass as the log-probs, in `shared`.)"""
    if shared is not None and shared.get("lens_jsd"):
        return shared["lens_jsd"]
    return objective.head(out, part, students=True, entropy=False)[2]


def attention_row_blocks(part: Rollout) -> Iterator[tuple[int, int, int]]:
    """(lo, hi, width) of each block of `ATTN_ROW_BLOCK` completion rows lo..hi-1. Causal row
    P-1+t attends to keys 0..P-1+t only, so the block needs just the first width = P-1+hi keys
    (exact: the rest have probability 0)."""
    P, C = part.prompt_length, part.completion_mask.shape[1]
    for lo in range(0, C, ATTN_ROW_BLOCK):
        hi = min(lo + ATTN_ROW_BLOCK, C)
        yield lo, hi, P - 1 + hi


def attention_divergence(out: PolicyOutputs, part: Rollout, objective: Objective,
                         shared: Mapping | None = None) -> dict[int, torch.Tensor]:
    """Per student layer, the per-token attention-row JSD to the final layer: {k: [b, C]}."""
    m, mask = objective.method, part.completion_mask
    keys = part.attention_mask.bool()
    per_tok: dict[int, list[torch.Tensor]] = {layer: [] for layer in objective.student_layers}
    for lo, hi, width in attention_row_blocks(part):
        with torch.no_grad():  # the teacher is detached: build no graph for its rows
            teacher = out.attention_rows(objective.num_layers, lo, hi, keys=width)  # [b, H, hi-lo, width]
        for layer in objective.student_layers:
            student = out.attention_rows(layer, lo, hi, keys=width)
            per_tok[layer].append(losses.attention_row_jsd(
                teacher, student, query_mask=mask[:, lo:hi].bool(), key_mask=keys[:, :width],
                head_reduce=m.attn_heads, exclude_sink=m.attn_exclude_sink, head_agg=m.attn_head_reduce))
    return {layer: torch.cat(parts, dim=1) for layer, parts in per_tok.items()}


@torch.no_grad()
def reference_logps(ref_model, part: Rollout, temperature: float, shared_prompt: bool = False) -> torch.Tensor:
    """Per-token log-probs [b, C] of the completion under a frozen reference model (for beta > 0)."""
    out = policy_forward(ref_model, part, shared_prompt=shared_prompt)
    return head_logps(out, part, temperature)


def head_logps(out: PolicyOutputs, part: Rollout, temperature: float) -> torch.Tensor:
    """The final layer's per-token log-probs [b, C] of the completion (0 off the mask), chunked."""
    mask = part.completion_mask
    rows = max(1, VOCAB_CHUNK_ELEMENTS // out.vocab)
    logps = out.head(mask, part.completion_ids, temperature, rows, entropy=False).logps
    return on_mask(logps, mask)


def on_mask(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token values [N] of the N set entries of `mask` [b, C], back at their places in [b, C]
    (0 elsewhere), with gradient."""
    return torch.zeros(mask.shape, dtype=values.dtype, device=values.device).masked_scatter(mask.bool(), values)


@torch.no_grad()
def old_policy_logps(model, rollout: Rollout, objective: Objective, micro_batch_size: int) -> torch.Tensor:
    """The old policy's per-token log-probs [B, C] of the whole rollout (before its first update),
    under the objective's policy head, in micro-batches of `micro_batch_size` rows (row order kept)."""
    C = rollout.completion_mask.shape[1]
    hidden = [objective.policy_layer] if objective.policy_layer is not None else []
    pieces = []
    for lo in range(0, len(rollout), micro_batch_size):
        part = rollout.select(slice(lo, lo + micro_batch_size))
        out = policy_forward(model, part, hidden_layers=hidden, readout=objective.readout,
                             shared_prompt=objective.grpo.shared_prompt)
        logps = objective.head(out, part, students=False, entropy=False)[0]
        pieces.append(torch.nn.functional.pad(logps, (0, C - logps.shape[1])))  # back to the full width
    return torch.cat(pieces)


def sampler_correction(rollout: Rollout, grpo) -> tuple[torch.Tensor, dict[str, float]]:
    """Sampler-mismatch weights of a rollout with `old_logps` and `sampler_logps`
    (`losses.sampler_importance_weights` with the grpo.vllm_importance_sampling_* settings), and
    TRL's `sampling/*` metrics: |old - sampler| over completion tokens, and the weights."""
    mask = rollout.completion_mask
    # a token without a sampler log-prob (NaN) counts as matching: no correction for it
    sampler = sampling_logps(rollout, rollout.old_logps)
    weights = losses.sampler_importance_weights(
        rollout.old_logps, sampler, mask, grpo.vllm_importance_sampling_mode,
        grpo.vllm_importance_sampling_clip_min, grpo.vllm_importance_sampling_clip_max)
    sel = mask.bool()
    delta = (rollout.old_logps - sampler).abs()[sel]
    flat = weights.flatten() if weights.shape[1] == 1 else weights[sel]
    stats = {}
    for name, values in (("sampling_logp_difference", delta), ("importance_sampling_ratio", flat)):
        for reduce in ("min", "mean", "max"):
            stats[f"sampling/{name}/{reduce}"] = float(getattr(values, reduce)()) if values.numel() else math.nan
    return weights, stats
