"""The values each choice-valued setting accepts: one list per setting, read by the config checks
and by the code that acts on the choice (torch-free, so the config never imports torch)."""

from __future__ import annotations

LOSS_TYPES = ("dapo", "grpo", "dr_grpo", "bnpo")
"""grpo.loss_type: how token losses are normalised (see `losses.aggregate`)."""
SCALE_REWARDS = ("group", "batch", "none")
"""grpo.scale_rewards: which standard deviation divides the advantages (see `losses.advantages`)."""
NONFINITE = ("skip", "stop")
"""grpo.nonfinite: what a step with a NaN/Inf gradient norm does."""
ROLLOUT_BACKENDS = ("hf", "vllm")
"""grpo.rollout_backend."""
WEIGHTINGS = ("signed", "unsigned", "positive", "uniform")
"""method.weighting: per-completion weight of the alignment losses (see `losses.advantage_weights`)."""
HEAD_REDUCE = ("mean", "per_head")
"""method.attn_heads: attention rows averaged over heads, or compared head by head."""
LENS_GRAD_MODES = ("full", "hidden_only")
"""method.lens_grad: whether the logit lens passes gradient to its readout weights."""
WANDB_MODES = ("offline", "online", "disabled")
"""log.wandb_mode."""
OPTIMIZERS = ("adamw", "adamw_kahan")
"""grpo.optimizer: torch AdamW, or torch-optimi's AdamW with Kahan-compensated updates (half-precision weights)."""
DTYPES = ("float32", "bfloat16", "float16")
"""model.dtype."""
