"""The measured side of a plan: the same step on real tensors (random weights), with the memory
measurement the benchmarks use (torch.profiler's CPU allocator events), to check a plan."""

from __future__ import annotations

from .setup import (
    autocast_for,
    build_module,
    build_policy,
    micro_batches,
    reference_model,
    step_shape,
)
from .trace import training_step, warm_optimizer


def measure_step(cfg, prompt_length: int, seed: int = 0) -> dict:
    """Bytes of one real training step on this machine's CPU: the peak allocated inside the step
    (`step`, as the plan's traced step peak), and the parameters and optimizer state held before it."""
    # on use: the planner builds models and traces the step only when a plan is made
    from ..synthetic import profiler_peak
    from .model_config import load_model_config
    from .trace import tensor_bytes

    mc = load_model_config(cfg.model.name)
    shape = step_shape(cfg, prompt_length)
    policy = build_policy(cfg, mc, seed)
    ref = reference_model(cfg, mc)
    module = build_module(cfg, policy, ref)
    opt = module.configure_optimizers()["optimizer"]
    opt_bytes = warm_optimizer(opt)
    parts = micro_batches(shape, mc.vocab_size, seed=seed)
    view = module.gradient_view() if cfg.log.gradient_view else None  # a logging step, as the plan's
    peak = profiler_peak(lambda: training_step(module, opt, parts, autocast_for(cfg), view=view))
    return {"step": peak, "parameters": tensor_bytes(policy.parameters()), "optimizer": opt_bytes}
