"""The memory plan of a resolved config: trace the step on fake tensors (at full depth, or at two
cut depths extrapolated per layer), add what tracing cannot see, and sum the phases per device."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch

from ..anatomy import decoder_layers
from . import formulas
from .setup import (
    StepShape,
    at_depth,
    autocast_for,
    build_module,
    build_policy,
    micro_batches,
    reference_model,
    step_shape,
    with_depth,
)
from .trace import Phase, fake_mode, tensor_bytes, trace, trace_step, warm_optimizer

FULL_DEPTH_LIMIT = 12
"""Models up to this many layers are traced whole; deeper ones at two cut depths."""


@dataclass
class Traced:
    """Bytes of one traced depth (single device, nothing sharded)."""

    layers: int
    params: int
    grads: int
    optimizer: int
    reference: int
    step: Phase
    diagnostics: Phase
    layer_params: int = 0
    """Bytes of one decoder layer's parameters (what per-layer FSDP gathers at a time)."""

    def with_state_scaled(self, factor: float) -> Traced:
        """Parameters, gradients, optimizer state and reference stored `factor` times as wide."""
        if factor == 1:
            return self
        return replace(self, params=round(self.params * factor), grads=round(self.grads * factor),
                       optimizer=round(self.optimizer * factor), reference=round(self.reference * factor),
                       layer_params=round(self.layer_params * factor))

    def scaled(self, other: Traced, layers: int) -> Traced:
        """Linear in depth through (self.layers, self) and (other.layers, other)."""
        f = (layers - self.layers) / (other.layers - self.layers)

        def lin(a: int, b: int) -> int:
            return round(a + f * (b - a))

        def phase(a: Phase, b: Phase) -> Phase:
            keys = set(a.at_peak) | set(b.at_peak)
            return Phase(lin(a.peak, b.peak), {k: lin(a.at_peak.get(k, 0), b.at_peak.get(k, 0)) for k in keys},
                         b.during)

        return Traced(layers, lin(self.params, other.params), lin(self.grads, other.grads),
                      lin(self.optimizer, other.optimizer), lin(self.reference, other.reference),
                      phase(self.step, other.step), phase(self.diagnostics, other.diagnostics),
                      lin(self.layer_params, other.layer_params))


def trace_depth(cfg, model_config, layers: int, shape: StepShape, gpu: bool) -> Traced:
    """Trace one step (its last micro-batch, which holds the gradients of the earlier ones) of the
    policy cut to `layers` layers, on fake tensors."""
    run_cfg = cfg if layers == model_config.num_hidden_layers else at_depth(cfg, layers)
    mc = with_depth(model_config, layers)
    with fake_mode():
        policy = build_policy(run_cfg, mc)
        ref = reference_model(run_cfg, mc)
        module = build_module(run_cfg, policy, ref)
        opt = module.configure_optimizers()["optimizer"]
        for group in opt.param_groups:
            group["foreach"] = gpu or group.get("foreach")  # CUDA parameters take the foreach path
        opt_bytes = warm_optimizer(opt)
        parts = micro_batches(shape, mc.vocab_size, count=2)  # the second stands for all later ones
        # the peak step is a logging step: with the gradient view on, its per-term gradients
        view = module.gradient_view(derive_policy=view_derives_policy(cfg)) if run_cfg.log.gradient_view else None
        step = trace_step(module, opt, parts, autocast_for(cfg), view=view)
        grads = tensor_bytes(p.grad for p in policy.parameters() if p.grad is not None)
        return Traced(layers, tensor_bytes(policy.parameters()), grads, opt_bytes,
                      tensor_bytes(ref.parameters()) if ref is not None else 0, step, Phase(),
                      _layer_bytes(policy))


def _layer_bytes(policy) -> int:
    """Bytes of the first decoder layer's parameters (0 for a model without a list of decoder
    layers: FSDP is then planned as gathering the whole model)."""
    try:
        return tensor_bytes(decoder_layers(policy)[0].parameters())
    except (ValueError, IndexError):
        return 0


def trace_diagnostics(cfg, model_config, shape: StepShape) -> Phase:
    """One pass of the per-layer diagnostics (no grad) as `LogStepHook.diagnose` runs it on
    logging steps: `diagnostics.diag_rows` rollouts, the diagnosed layers of the full-depth model
    (their number does not grow linearly with depth, so this is never extrapolated)."""
    # on use: the planner builds models and traces the step only when a plan is made
    from .. import diagnostics
    from ..run_hooks import MAX_DIAG_ROWS

    seq = shape.prompt_length + shape.completion_length
    rows = min(diagnostics.diag_rows(seq, shape.micro_batch), MAX_DIAG_ROWS, shape.rows)
    with fake_mode():
        module = build_module(cfg, build_policy(cfg, model_config))
        (part, _), = micro_batches(StepShape(shape.prompt_length, shape.completion_length, rows, rows),
                                   model_config.vocab_size, count=1)
        adv = part.advantages
        layers = diagnostics.diagnosed_layers(module.num_layers, cfg.log.diag_layers, module.student_layers)

        def run():
            with torch.no_grad(), autocast_for(cfg)():
                diagnostics.layer_metrics(module.policy, module.readout, part, adv, (adv > 0).float(), layers,
                                          cfg.method.chunk_size)

        return trace(run, "lens and attention metrics", module.policy)[0]


def trace_model(cfg, model_config, shape: StepShape, gpu: bool, max_layers: int = FULL_DEPTH_LIMIT) -> tuple[Traced, str]:
    """(traced bytes at the model's depth, how they were obtained)."""
    depth = model_config.num_hidden_layers
    diag = trace_diagnostics(cfg, model_config, shape)
    if depth <= max_layers:
        traced = trace_depth(cfg, model_config, depth, shape, gpu)
        return replace(traced, diagnostics=diag), f"traced at full depth ({depth} layers)"
    low = (len(cfg.method.layers) or 1) + 1
    a = trace_depth(cfg, model_config, low, shape, gpu)
    b = trace_depth(cfg, model_config, low + 2, shape, gpu)
    return replace(a.scaled(b, depth), diagnostics=diag), (
        f"step traced at {low} and {low + 2} layers, extrapolated per layer to {depth}; "
        "diagnostics traced at full depth")


@dataclass
class Plan:
    """Per-device bytes of a run: persistent state, each phase's peak and where it comes from."""

    setup: dict
    state: dict[str, int]
    phases: dict[str, dict[str, int]]
    estimated: list[str]
    method: str
    seconds: float = 0.0
    suggestions: list[dict] = field(default_factory=list)

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=lambda k: self.phases[k]["total"])

    @property
    def peak(self) -> int:
        return self.phases[self.peak_phase]["total"]

    @property
    def required(self) -> int:
        """Peak plus allocator fragmentation and the process's fixed overheads (GPU runs)."""
        s = self.setup
        if not s["gpu"]:
            return self.peak
        extra = formulas.CUDA_CONTEXT_BYTES + (formulas.NCCL_BYTES if s["world"] > 1 else 0)
        return round(self.peak * (1 + formulas.FRAGMENTATION)) + extra

    def fits(self, memory_bytes: int) -> bool:
        return self.required <= memory_bytes

    def to_dict(self) -> dict:
        return {"setup": self.setup, "state": self.state, "phases": self.phases, "estimated": self.estimated,
                "method": self.method, "peak_phase": self.peak_phase, "peak_bytes": self.peak,
                "required_bytes": self.required, "seconds": self.seconds, "suggestions": self.suggestions}


DEFAULT_PROMPT_LENGTH = 512
"""Prompt tokens assumed for real datasets (chat template plus a competition problem)."""


def view_derives_policy(cfg) -> bool:
    """Whether the run's gradient view takes the policy term as `.grad` minus the alignment terms
    (one process, no loss scaler) rather than from a backward pass of its own (DDP, FSDP, fp16's
    scaler): one term's gradient buffer fewer (`OISDModule.gradient_view`)."""
    return (world_size(cfg) == 1 and not str(cfg.strategy).startswith("fsdp")
            and str(cfg.precision) not in ("16-mixed", "16"))


def world_size(cfg) -> int:
    """Ranks of the run: devices per node times `num_nodes` (FSDP shards over all of them)."""
    return _devices_per_node(cfg) * max(int(getattr(cfg, "num_nodes", 1) or 1), 1)


def _devices_per_node(cfg) -> int:
    devices = cfg.devices
    if isinstance(devices, int) and devices > 0:
        return devices
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if isinstance(devices, str) and devices.isdigit():
        return int(devices)
    return torch.cuda.device_count() or 1 if str(devices) in ("auto", "-1") else 1


def on_gpu(cfg) -> bool:
    return cfg.accelerator in ("gpu", "cuda") or (cfg.accelerator == "auto" and torch.cuda.is_available())


def default_prompt_length(cfg) -> tuple[int, str]:
    """(prompt tokens, where the number comes from): the longest of 64 training prompts of a
    synthetic task for a tiny model (character tokens), else an assumed length."""
    # on use: the planner builds models and traces the step only when a plan is made
    from ..models import is_tiny
    from ..tasks import TASKS

    if is_tiny(cfg.model.name) and cfg.task.name in TASKS:
        # on use: the planner builds models and traces the step only when a plan is made
        from ..sources import load_source

        problems = load_source(cfg.task).train_batch(0, 64, cfg.seed)
        return max(len(p.prompt) for p in problems), "longest of 64 training prompts"
    return DEFAULT_PROMPT_LENGTH, "assumed (--prompt-length)"


def run_prompt_length(problems, tokenize) -> tuple[int, str]:
    """(prompt tokens, where the number comes from) of a run: the longest of its first training
    prompts as the run formats and tokenizes them (`tokenize(text) -> token count`); a step's
    prompts are left-padded to the longest of its batch."""
    return max(tokenize(p.prompt) for p in problems), f"longest of the run's first {len(problems)} training prompts"


def traced_config(cfg):
    """The config whose step is traced. FSDP's mixed precision hands the forward bf16 copies of
    fp32 parameters (no autocast weight casts, gradients in bf16 until reduce-scattered): that is
    a bf16 policy under autocast; the fp32 state is then rescaled (`make_plan`)."""
    param_dtype, low = formulas.precision_dtypes(cfg.precision, cfg.model.dtype)
    if not str(cfg.strategy).startswith("fsdp") or low is None or low == param_dtype:
        return cfg
    # on use: the planner builds models and traces the step only when a plan is made
    from .suggest import with_overrides

    return with_overrides(cfg, {"model.dtype": str(low).removeprefix("torch.")})


def trace_key(cfg, prompt_length, max_layers: int) -> str:
    """What a trace depends on (the strategy and device count move the persistent state, and the
    gradient view's terms: one term fewer where it derives the policy's)."""
    cfg = traced_config(cfg)
    return repr((cfg.model, cfg.method, cfg.grpo, cfg.precision, cfg.log.gradient_view, view_derives_policy(cfg),
                 on_gpu(cfg), prompt_length,
                 max_layers))


DEFAULT_DEVICE_MEMORY = 80 * 2**30
"""A GPU's memory when none is given (what `grpo.vllm_gpu_memory_utilization` is a share of)."""


def make_plan(cfg, prompt_length: int | None = None, max_layers: int = FULL_DEPTH_LIMIT,
              cache: dict | None = None, device_memory: int | None = None) -> Plan:
    """The memory plan of `cfg` per device; nothing is downloaded and no memory is used.
    `cache`: traces by `trace_key`, shared between plans of variants of one config.
    `device_memory`: bytes of one GPU (default 80 GiB), of which a vLLM engine reserves its share."""
    # on use: the planner builds models and traces the step only when a plan is made
    from .model_config import load_model_config

    start = time.time()
    mc = load_model_config(cfg.model.name)
    source = "given"
    if prompt_length is None:
        prompt_length, source = default_prompt_length(cfg)
    shape = step_shape(cfg, prompt_length)
    gpu, world = on_gpu(cfg), world_size(cfg)
    fsdp = str(cfg.strategy).startswith("fsdp")
    key = trace_key(cfg, prompt_length, max_layers)
    cache = {} if cache is None else cache
    if key not in cache:
        cache[key] = trace_model(traced_config(cfg), mc, shape, gpu, max_layers)
    traced, how = cache[key]
    param_dtype, low = formulas.precision_dtypes(cfg.precision, cfg.model.dtype)
    traced = traced.with_state_scaled(param_dtype.itemsize / _traced_dtype(cfg).itemsize)
    state, estimated = _state(traced, world, fsdp)
    phases = _phases(cfg, mc, shape, traced, state, fsdp, param_dtype, low)
    if cfg.grpo.rollout_backend == "vllm":
        engine = vllm_engine_bytes(cfg, traced.params // param_dtype.itemsize, param_dtype.itemsize, gpu,
                                   device_memory or DEFAULT_DEVICE_MEMORY)
        for parts in phases.values():  # the colocated engine holds its memory for the whole run
            for ours in ("KV cache", "decoding step", "total"):
                parts.pop(ours, None)
            parts.update(engine)
            parts["total"] = sum(parts.values())
        estimated += ["vLLM engine: on GPUs the share grpo.vllm_gpu_memory_utilization of the device's memory, "
                      "which vLLM reserves at start (weights, activations, KV cache); on CPU its weights in "
                      "the policy's dtype and the KV cache of grpo.vllm_cpu_kv_cache_gib, as the engine "
                      "reports them (vllm/weights_gib, vllm/kv_cache_gib) (formula)"]
    else:
        estimated += ["KV cache and decoding step of the rollout (formula)"]
    if gpu:
        estimated += [f"allocator fragmentation (+{formulas.FRAGMENTATION:.0%}), CUDA context"
                      + (" and NCCL buffers" if world > 1 else "") + " (fixed sizes)"]
    setup = {
        "model": cfg.model.name, "layers": mc.num_hidden_layers, "vocab_size": mc.vocab_size,
        "parameters": traced.params // param_dtype.itemsize, "precision": cfg.precision,
        "param_dtype": str(param_dtype).removeprefix("torch."),
        "compute_dtype": str(low or param_dtype).removeprefix("torch."),
        "strategy": "fsdp" if fsdp else ("ddp" if world > 1 else "single device"), "world": world, "gpu": gpu,
        "rows": shape.rows, "micro_batch": shape.micro_batch, "micro_batches": shape.num_micro,
        "prompt_length": prompt_length, "prompt_length_source": source,
        "completion_length": shape.completion_length, "gradient_checkpointing": cfg.model.gradient_checkpointing,
        "logit_weight": cfg.method.logit_weight, "attn_weight": cfg.method.attn_weight, "beta": cfg.grpo.beta,
        "rollout_backend": cfg.grpo.rollout_backend,
    }
    return Plan(setup, state, phases, estimated, how, seconds=time.time() - start)


def vllm_engine_bytes(cfg, n_params: int, dtype_bytes: int, gpu: bool, device_memory: int) -> dict[str, int]:
    """Bytes of the colocated vLLM engine per device, by row: on a GPU the whole share it reserves
    (grpo.vllm_gpu_memory_utilization x device_memory); on CPU its copy of the weights (the policy's
    dtype, as `VLLMRollout.for_policy` starts it) and its KV cache (grpo.vllm_cpu_kv_cache_gib)."""
    g = cfg.grpo
    if gpu:
        return {"vLLM engine (its share of the GPU)": round(g.vllm_gpu_memory_utilization * device_memory)}
    return {"vLLM engine weights": n_params * dtype_bytes, "vLLM KV cache": round(g.vllm_cpu_kv_cache_gib * 2**30)}


def _traced_dtype(cfg) -> torch.dtype:
    c = traced_config(cfg)
    return formulas.precision_dtypes(c.precision, c.model.dtype)[0]


def _state(traced: Traced, world: int, fsdp: bool) -> tuple[dict[str, int], list[str]]:
    """Persistent bytes per device: traced sizes, sharded by FSDP, or with DDP's buckets."""
    shard = (lambda b: formulas.fsdp_shard(b, world)) if fsdp else (lambda b: b)
    state = {"parameters": shard(traced.params), "gradients": shard(traced.grads),
             "optimizer state": shard(traced.optimizer), "reference model": traced.reference}
    estimated = []
    if fsdp:
        estimated.append("FSDP sharding of parameters, gradients and optimizer state (1/world each), "
                         "the parameters gathered for the rollout (all) and for the step and the diagnostics "
                         "(the root and one decoder layer at a time, two during backward; the whole model "
                         "through a logging step with the gradient view), the step's unsharded "
                         "gradients (the root's and those layers'), and the all-gather buffers of the root while "
                         "the rollout gathers it, where that is the rollout's peak (formula)")
    elif world > 1:
        state["DDP gradient buckets"] = formulas.ddp_bucket_bytes(traced.grads, world)
        estimated.append("DDP gradient buckets (one flat copy of the gradients, formula)")
    return state, estimated


def _phases(cfg, mc, shape: StepShape, traced: Traced, state: dict, fsdp: bool, param_dtype, low) -> dict:
    """Bytes of each phase by source, and their total."""
    n_params = traced.params // param_dtype.itemsize
    act = (low or param_dtype).itemsize
    gathered = {"rollout": {}, "diagnostics": {}, "policy step": {}}
    step = dict(traced.step.at_peak)
    if fsdp:  # the rollout gathers the whole model once; the step and the diagnostics a layer at a time
        per_layer = (n_params, traced.layer_params // param_dtype.itemsize, mc.num_hidden_layers)
        in_flight = formulas.fsdp_gathered_bytes(*per_layer, formulas.FSDP_STEP_LAYERS, act)
        # a logging step with the gradient view holds the whole model gathered through its backward
        step_gathered = n_params * act if cfg.log.gradient_view else in_flight
        gathered = {"rollout": n_params * act,
                    "diagnostics": formulas.fsdp_gathered_bytes(*per_layer, formulas.FSDP_DIAGNOSTICS_LAYERS, act),
                    "policy step": step_gathered}
        gathered = {k: {"FSDP gathered parameters": v} for k, v in gathered.items()}
        if "gradients" in step:
            # each layer's gradients are reduce-scattered as its backward ends: the sharded gradients,
            # plus, at a peak inside the backward, the unsharded ones (compute dtype) of the root and
            # the layers in flight (a later micro-batch's forward holds the sharded ones only)
            step["gradients"] = state["gradients"] + (in_flight if "backward" in traced.step.during else 0)
    kv_heads = getattr(mc, "num_key_value_heads", None) or mc.num_attention_heads
    head_dim = getattr(mc, "head_dim", None) or mc.hidden_size // mc.num_attention_heads
    tokens = shape.prompt_length + shape.completion_length
    geometry = (mc.num_hidden_layers, kv_heads, head_dim, shape.rows, tokens, act)
    # gradients live from one step's backward to the next's zero_grad
    without_grads = {k: v for k, v in state.items() if k != "gradients"}
    rollout = {**gathered["rollout"], "KV cache": formulas.kv_cache_bytes(*geometry),
               "decoding step": formulas.decode_step_bytes(*geometry, mc.vocab_size)}
    if fsdp:
        # the rollout gathers the root (embedding, final norm, unembedding) first: while it is copied
        # out of the all-gather buffer, the unsharded root, that buffer and the cast shard are live,
        # nothing else of the rollout yet. A narrow model with a large vocabulary peaks there.
        root = formulas.fsdp_gathered_bytes(*per_layer, 0, 1)  # the root's parameter count
        buffers = formulas.fsdp_gather_buffer_bytes(root, world_size(cfg), act,
                                                    cast=low is not None and low != param_dtype)
        at_gather = {"FSDP gathered parameters": root * act, "FSDP all-gather buffers": buffers}
        if sum(at_gather.values()) > sum(rollout.values()):
            rollout = at_gather
    phases = {
        "rollout": {**state, **rollout},
        "diagnostics": {**state, **gathered["diagnostics"],
                        **{f"diagnostics: {k}": v for k, v in traced.diagnostics.at_peak.items()}},
        "policy step": {**without_grads, **gathered["policy step"], **step},
    }
    for parts in phases.values():
        parts["total"] = sum(parts.values())
    return phases
