"""`log.plan=true`: the plan printed before training and kept in the run folder (plan.json),
and the measured peak of each phase of the first steps beside it (memory.json):
`torch.cuda.max_memory_allocated` on GPU; on CPU the bytes held by parameters, gradients,
optimizer state and reference model plus the profiler's peak inside the phase (as the
benchmarks measure)."""

from __future__ import annotations

import json

import torch

MEASURED_STEPS = 2
"""Steps whose phases are measured (the first is a logging step: it has the diagnostics pass)."""


def plan_run(cfg, run, module, log=print) -> None:
    """Plan `cfg`, print it, write plan.json, and measure the phases of `module`'s first steps
    (rank 0 of a multi-process run only)."""
    # on use: the planner builds models and traces the step only when a plan is made
    from ..run.trainer import launched_rank
    from . import plan

    if launched_rank() != 0:
        return
    # on use: the planner builds models and traces the step only when a plan is made
    from .planner import run_prompt_length
    from .report import GIB, format_plan

    memory = torch.cuda.get_device_properties(0).total_memory / GIB if torch.cuda.is_available() else None
    problems = module.task.train_batch(0, 64, cfg.seed)
    length, source = run_prompt_length(
        problems, lambda text: len(module.tokenizer(module.format_prompt(text))["input_ids"]))
    result = plan(cfg, memory, prompt_length=length, prompt_source=source)
    log(format_plan(result, round(memory * GIB) if memory else None))
    run.plan.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    meter = PhaseMeter(run.memory, {k: v["total"] for k, v in result.phases.items()}, module)
    module.sampler = meter.wrap(module.sampler, "rollout")
    module.optimise = meter.wrap(module.optimise, "policy step")
    if module.on_log_step is not None:
        module.on_log_step = meter.wrap(module.on_log_step, "diagnostics")


class PhaseMeter:
    """Peak bytes of each wrapped phase over its first calls, written beside the planned ones."""

    def __init__(self, path, planned: dict[str, int], module) -> None:
        self.path, self.planned, self.module = path, planned, module
        self.measured: dict[str, int] = {}
        self.calls: dict[str, int] = {}

    def wrap(self, fn, phase: str):
        def wrapper(*args, **kwargs):
            self.calls[phase] = self.calls.get(phase, 0) + 1
            if self.calls[phase] > MEASURED_STEPS:
                return fn(*args, **kwargs)
            result, peak = self._measure(lambda: fn(*args, **kwargs))
            self.measured[phase] = max(self.measured.get(phase, 0), peak)
            self._write()
            return result

        return wrapper

    def _measure(self, fn) -> tuple[object, int]:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            result = fn()
            return result, torch.cuda.max_memory_allocated()
        # on use: the planner builds models and traces the step only when a plan is made
        from ..synthetic import profiler_peak

        held, box = self._held(), []
        peak = profiler_peak(lambda: box.append(fn()))
        return box[0], held + peak

    def _held(self) -> int:
        # on use: the planner builds models and traces the step only when a plan is made
        from .trace import tensor_bytes

        # the module's parameters, and the optimizer's: under FSDP a gathered unit's module parameters
        # are its unsharded copies, while the optimizer holds the shards (both are held)
        params = list(self.module.policy.parameters())
        for opt in self.module.trainer.optimizers:
            params += [p for group in opt.param_groups for p in group["params"]]
        tensors = [*params, *(p.grad for p in params if p.grad is not None)]
        for opt in self.module.trainer.optimizers:
            tensors += [v for state in opt.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
        for ref in self.module.reference_models:
            tensors += list(ref.parameters())
        return tensor_bytes(tensors)

    def _write(self) -> None:
        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        rows = {phase: {"planned_bytes": self.planned.get(phase), "measured_bytes": peak,
                        "ratio": peak / self.planned[phase] if self.planned.get(phase) else None}
                for phase, peak in self.measured.items()}
        self.path.write_text(json.dumps({"device": device, "steps": MEASURED_STEPS, "phases": rows}, indent=2) + "\n")
