"""The values each choice-valued setting accepts: one list per setting, read by the config checks
and by the code that acts on the choice (torch-free, so the config never imports torch)."""

from __future__ import annotations

LOSS_TYPES = ("dapo", "grpo", "dr_grpo", "bnpo", "luspo")
"""How token losses are normalised (see `losses.aggregate`)."""
TOKEN_SUM_LOSS_TYPES = ("bnpo", "dr_grpo", "dapo", "cispo")
"""Policy losses that sum token contributions, so a sequence-level ratio weights each completion by
its length (TRL warns about that pairing)."""
KL_ESTIMATORS = ("k3", "low_var_kl", "k1", "abs", "k2", "k1+", "k3+", "low_var_kl+")
"""grpo.kl_estimator: the per-token KL estimate of the beta term (see `losses.kl_estimate`)."""
MULTI_OBJECTIVE_AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")
"""grpo.multi_objective_aggregation (TRL's names)."""
IS_LEVELS = ("token", "sequence")
"""grpo.importance_sampling_level: one probability ratio per token, or per sequence (GSPO)."""
SAMPLER_IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
"""grpo.vllm_importance_sampling_mode (see `losses.sampler_importance_weights`)."""
SCALE_REWARDS = ("group", "batch", "none")
"""grpo.scale_rewards: which standard deviation divides the advantages (see `losses.group_advantages`)."""
NONFINITE = ("skip", "stop")
"""grpo.nonfinite: what a step with a NaN/Inf gradient norm does."""
ROLLOUT_BACKENDS = ("hf", "vllm")
"""grpo.rollout_backend."""
WEIGHTINGS = ("signed", "unsigned", "positive", "uniform", "reward")
"""method.weighting (and think_/attn_weighting): per-completion weight of the alignment losses (see
`losses.advantage_weights`)."""
HEAD_REDUCE = ("mean", "per_head", "per_head_to_mean")
"""method.attn_heads: attention rows averaged over heads, compared head by head, or each student
head against the teacher's head mean."""
HEAD_AGG = ("mean", "sum")
"""method.attn_head_reduce: how per-head attention divergences combine."""
SCHEDULES = ("constant", "stop", "linear")
"""method.align_schedule: the alignment weights' multiplier over training (see `losses.alignment_scale`)."""
JSD_TEMPERATURE_SAMPLING = "sampling"
"""method.jsd_temperature: the word that sets the logit channel's temperature to grpo.temperature
(see `step.Objective.jsd_temperature`); any other value is a number > 0."""
LENS_GRAD_MODES = ("full", "hidden_only")
"""method.lens_grad: whether the logit lens passes gradient to its readout weights."""
WANDB_MODES = ("offline", "online", "disabled")
"""log.wandb_mode."""
OPTIMIZERS = ("adamw", "adamw_kahan")
"""grpo.optimizer: torch AdamW, or torch-optimi's AdamW with Kahan-compensated updates (half-precision weights)."""
DTYPES = ("float32", "bfloat16", "float16")
"""model.dtype."""

VLLM_RESERVED_KWARGS = ("model", "tokenizer", "skip_tokenizer_init", "seed")
"""`vllm.LLM` arguments the vLLM backend sets itself; grpo.vllm_engine_kwargs may not name them."""
