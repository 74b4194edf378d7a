"""The pieces of one training step built from a config alone: policy (random or fake weights),
the module that owns the loss code, its optimizer and the micro-batches of a planning rollout."""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import unset_fake_temporarily
from transformers import AutoModelForCausalLM

from .. import lora
from .formulas import DTYPES, precision_dtypes


@dataclass
class StepShape:
    """What one device processes in one optimisation step."""

    prompt_length: int
    completion_length: int
    rows: int
    """Completions per device per step (prompts_per_step x num_generations)."""
    micro_batch: int

    @property
    def num_micro(self) -> int:
        return -(-self.rows // self.micro_batch)


def step_shape(cfg, prompt_length: int) -> StepShape:
    g = cfg.grpo
    rows = g.prompts_per_step * g.num_generations
    return StepShape(prompt_length, g.max_completion_length, rows, min(g.micro_batch_size, rows))


def with_depth(model_config, layers: int):
    """The same config with `layers` decoder layers (per-layer lists cut to match)."""
    data = copy.deepcopy(model_config.to_dict())
    data["num_hidden_layers"] = layers
    for key in ("layer_types", "mlp_only_layers"):
        if isinstance(data.get(key), list):
            data[key] = data[key][:layers]
    if "max_window_layers" in data:
        data["max_window_layers"] = min(data["max_window_layers"], layers)
    return type(model_config).from_dict(data)


def build_policy(cfg, model_config, seed: int = 0):
    """The policy as a run trains it: the precision's parameter dtype, the attention kernel,
    gradient checkpointing, training mode."""
    # on use: the planner builds models and traces the step only when a plan is made
    from ..run.trainer import enable_checkpointing

    param_dtype, _ = precision_dtypes(cfg.precision, cfg.model.dtype)
    torch.manual_seed(seed)
    m = cfg.model
    # peft moves new adapters onto their base layer's device, which fake parameters refuse: under
    # fake tensors the adapted model is built on the meta device outside the fake mode, then given
    # fake storage
    faking = m.lora_rank and detect_fake_mode() is not None
    with contextlib.ExitStack() as outside:
        if faking:
            outside.enter_context(unset_fake_temporarily())
            outside.enter_context(torch.device("meta"))
        policy = AutoModelForCausalLM.from_config(model_config, attn_implementation=m.attn_implementation,
                                                  dtype=param_dtype)
        if m.lora_rank:  # adapters on the decoder layers, the rest frozen, as `train` attaches them
            policy = lora.attach(policy, m.lora_rank, m.lora_alpha, m.lora_dropout, m.lora_targets)
    if faking:
        policy.to_empty(device="cpu")  # a new tensor per parameter: tied embeddings are tied again
        policy.get_base_model().tie_weights()
    if cfg.model.gradient_checkpointing:
        enable_checkpointing(policy)
    return policy.train()


def build_module(cfg, policy, ref=None):
    # on use: the planner builds models and traces the step only when a plan is made
    from ..module import OISDModule

    return OISDModule(cfg, policy, tokenizer=None, ref_model=ref)


def at_depth(cfg, layers: int):
    """The run's config for a model cut to `layers` decoder layers: the same number of student
    layers, placed where they exist (the memory of an alignment loss does not depend on which
    layer is the student; every hidden state is kept for backward anyway)."""
    # on use: the planner builds models and traces the step only when a plan is made
    from ..lens import default_student_layer

    out = copy.deepcopy(cfg)
    count = len(cfg.method.layers) or 1
    if layers <= count:
        raise ValueError(f"a model cut to {layers} layers cannot hold {count} student layers")
    out.method.layers = list(range(1, count + 1)) if cfg.method.layers else [default_student_layer(layers)]
    return out


def micro_batches(shape: StepShape, vocab_size: int, count: int | None = None, seed: int = 0) -> list:
    """(rollout with its advantages, normalisers) of the first `count` micro-batches of a step whose
    completions all run to full length (the bench's synthetic rollout, one prompt left-padded)."""
    # on use: the planner builds models and traces the step only when a plan is made
    from ..synthetic import VocabOnly, synthetic_rollout

    mb, n = shape.micro_batch, count or shape.num_micro
    tokens = torch.tensor(float(shape.rows * shape.completion_length))
    norm = dict(num_items_in_batch=tokens, num_sequences=shape.rows, max_completion_length=shape.completion_length)
    parts = []
    for i in range(min(n, shape.num_micro)):
        rollout = synthetic_rollout(VocabOnly(vocab_size), mb, shape.prompt_length, shape.completion_length,
                                     seed + i)
        rollout.attention_mask[-1, 0] = 0  # prompts of different lengths: left padding, so a 4-D mask is built
        parts.append((rollout.scored(torch.linspace(-1.5, 1.5, mb)), norm))
    return parts


def autocast_for(cfg):
    """The autocast context Lightning's precision plugin opens around a training step (CPU
    autocast stands in for CUDA's: the same operators run in the low precision)."""
    _, low = precision_dtypes(cfg.precision, cfg.model.dtype)
    if low is None:
        return contextlib.nullcontext
    return lambda: torch.autocast("cpu", dtype=low)


def reference_model(cfg, model_config):
    """The frozen reference (grpo.beta > 0): a copy of the starting policy in `model.dtype`,
    outside the Lightning module, so the precision plugin never casts it."""
    if cfg.grpo.beta <= 0:
        return None
    ref = AutoModelForCausalLM.from_config(model_config, attn_implementation=cfg.model.attn_implementation,
                                           dtype=DTYPES[cfg.model.dtype])
    return ref.eval().requires_grad_(False)
