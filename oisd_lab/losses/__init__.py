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

The functions live in four modules, all re-exported here (`losses.X` is the way to call them):
`numerics` (log-probs and entropies over the vocabulary, in chunks and in float32), `policy`
(advantages, the importance ratio, the policy surrogates and their masks, the sampler
correction, the KL estimators), `aggregation` (per-token losses into one number, the alignment
loss and its schedule) and `divergence` (JSD and KL, the logit lens, the fused vocabulary pass,
the attention rows).
"""

from __future__ import annotations

from .aggregation import (  # noqa: F401
    ADVANTAGE_SIGNS,
    aggregate,
    aggregation_of,
    alignment_loss,
    alignment_scale,
    divergence_sums,
)
from .divergence import (  # noqa: F401
    HeadOutputs,
    StudentJSD,
    attention_cosine,
    attention_row_jsd,
    chunked_head,
    chunked_lens_jsd,
    jsd,
    kl_from_logits,
    lens_divergences,
)
from .numerics import (  # noqa: F401
    LOG_RATIO_CLAMP,
    chunked_logps,
    entropy_from_logits,
    selective_log_softmax,
    token_logps,
    upcast,
)
from .policy import (  # noqa: F401
    advantage_weights,
    advantages_of,
    cispo_policy_loss,
    cispo_surrogate,
    clipped_policy_loss,
    clipped_surrogate,
    group_advantages,
    grpo_estimator,
    high_entropy_mask,
    importance_ratio,
    kl_estimate,
    kl_k3,
    normalize_then_sum_advantages,
    off_policy_mask,
    policy_loss,
    ppo_clip,
    reinforce_plus_plus_baseline_estimator,
    reinforce_plus_plus_estimator,
    rloo_estimator,
    sampler_importance_weights,
    sapo_policy_loss,
    sapo_surrogate,
    vespo_gamma_weights,
    vespo_policy_loss,
)

LENS_CHECKPOINT_MIN_ELEMENTS = 1 << 26
"""Tokens x vocabulary of the lens above which its chunks are recomputed in backward. Below it,
each chunk keeps one [chunk, V] float32 tensor (its student-logit gradient, at most 256 MiB in
all) and nothing is recomputed; above it, at most one chunk's [chunk, V] tensors are alive."""



__all__ = ["ADVANTAGE_SIGNS", "HeadOutputs", "LENS_CHECKPOINT_MIN_ELEMENTS", "LOG_RATIO_CLAMP", "StudentJSD", "advantage_weights", "advantages_of", "aggregate", "aggregation_of", "alignment_loss", "alignment_scale", "attention_cosine", "attention_row_jsd", "chunked_head", "chunked_lens_jsd", "chunked_logps", "cispo_policy_loss", "cispo_surrogate", "clipped_policy_loss", "clipped_surrogate", "divergence_sums", "entropy_from_logits", "group_advantages", "grpo_estimator", "high_entropy_mask", "importance_ratio", "jsd", "kl_estimate", "kl_from_logits", "kl_k3", "lens_divergences", "normalize_then_sum_advantages", "off_policy_mask", "policy_loss", "ppo_clip", "reinforce_plus_plus_baseline_estimator", "reinforce_plus_plus_estimator", "rloo_estimator", "sampler_importance_weights", "sapo_policy_loss", "sapo_surrogate", "selective_log_softmax", "token_logps", "upcast", "vespo_gamma_weights", "vespo_policy_loss"]
