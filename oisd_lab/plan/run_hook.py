"""`log.plan=true`: the plan printed before training and kept in the run folder (plan.json),
and the measured peak of each phase of the first steps beside it, per rank (memory.json for
rank 0, memory.rank<r>.json for rank r):
`torch.cuda.max_memory_allocated` on GPU; on CPU the bytes held by parameters, gradients,
optimizer state and reference model plus the profiler's peak inside the phase (as the
benchmarks measure)."""

from __future__ import annotations

import contextlib
import json

import torch

MEASURED_STEPS = 2
"""Steps whose phases are measured (the first is a logging step: it has the diagnostics pass)."""


def plan_run(cfg, run, module, log=print) -> None:
    """Plan `cfg` and measure the phases of `module`'s first steps on every rank (memory.json for
    rank 0, memory.rank<r>.json for the others); rank 0 prints the plan and writes plan.json."""
    # on use: the planner builds models and traces the step only when a plan is made
    from ..run.trainer import launched_rank
    from . import plan
    from .planner import run_prompt_length
    from .report import GIB, format_plan

    rank = launched_rank()
    memory = torch.cuda.get_device_properties(0).total_memory / GIB if torch.cuda.is_available() else None
    sampler = module.sampler
    problems = sampler.task.train_batch(0, 64, cfg.seed)
    length, source = run_prompt_length(
        problems, lambda text: len(sampler.tokenizer(sampler.format_prompt(text))["input_ids"]))
    result = plan(cfg, memory, prompt_length=length, prompt_source=source)
    if rank == 0:
        log(format_plan(result, round(memory * GIB) if memory else None))
        run.plan.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    planned = {k: v["total"] for k, v in result.phases.items()}
    module.phases.subscribe(PhaseMeter(run.memory_of(rank), planned, module))


MEASURED_PHASES = ("rollout", "policy step", "diagnostics")
"""The module's phases (`OISDModule.phases`) measured, by the names of the plan's phases."""


class PhaseMeter:
    """Peak bytes of each measured phase over its first calls, written beside the planned ones; an
    observer of the module's phases."""

    def __init__(self, path, planned: dict[str, int], module) -> None:
        self.path, self.planned, self.module = path, planned, module
        self.measured: dict[str, int] = {}
        self.calls: dict[str, int] = {}

    def __call__(self, phase: str):
        if phase not in MEASURED_PHASES:
            return None
        self.calls[phase] = self.calls.get(phase, 0) + 1
        return self._measured(phase) if self.calls[phase] <= MEASURED_STEPS else None

    @contextlib.contextmanager
    def _measured(self, phase: str):
        with self._peak() as peak:
            yield
        self.measured[phase] = max(self.measured.get(phase, 0), peak["bytes"])
        self._write()

    @contextlib.contextmanager
    def _peak(self):
        """The peak bytes of the block, as "bytes" of the dict it yields."""
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            out = {}
            yield out
            out["bytes"] = torch.cuda.max_memory_allocated()
            return
        # on use: the planner builds models and traces the step only when a plan is made
        from ..synthetic import profiled_peak

        held = self._held()
        with profiled_peak() as out:
            yield out
        out["bytes"] += held

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
