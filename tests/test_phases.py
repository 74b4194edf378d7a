"""The step's named phases: what an observer sees, in what order, and the step timer built on them."""

from __future__ import annotations

import contextlib
import time

import torch
from conftest import fit_rows

from oisd_lab.config import compose
from oisd_lab.module import PHASES, TIMED_PHASES, OISDModule
from oisd_lab.phases import Phases, StepTimer
from oisd_lab.plan.model_config import load_model_config
from oisd_lab.plan.setup import StepShape, autocast_for, build_module, build_policy, micro_batches
from oisd_lab.plan.trace import training_step
from oisd_lab.sampler import Sampler
from oisd_lab.sources import load_source


class _Recorder:
    """An observer that keeps (depth, name) of each phase entered and the wall seconds of each."""

    def __init__(self):
        self.entered: list[tuple[int, str]] = []
        self.seconds: list[tuple[int, str, float]] = []
        self.depth = 0

    def __call__(self, name):
        return self._phase(name)

    @contextlib.contextmanager
    def _phase(self, name):
        self.entered.append((self.depth, name))
        self.depth += 1
        start = time.perf_counter()
        try:
            yield
        finally:
            self.depth -= 1
            self.seconds.append((self.depth, name, time.perf_counter() - start))


def test_observers_enter_in_order_and_leave_in_reverse_and_can_unsubscribe():
    phases, seen = Phases(), []

    def observer(tag):
        @contextlib.contextmanager
        def context(name):
            seen.append(f"{tag} enters {name}")
            yield
            seen.append(f"{tag} leaves {name}")

        return context

    unsubscribe = phases.subscribe(observer("a"))
    with phases.subscribed(observer("b")):
        with phases("outer"), phases("inner"):
            pass
    unsubscribe()
    with phases("unseen"):
        pass
    assert seen == ["a enters outer", "b enters outer", "a enters inner", "b enters inner",
                    "b leaves inner", "a leaves inner", "b leaves outer", "a leaves outer"]
    assert phases.observers == []


def test_the_step_timer_sums_the_outermost_phases_only():
    phases, timer = Phases(), StepTimer({"a": "time/a", "b": "time/b"})
    with phases.subscribed(timer):
        for _ in range(2):
            with phases("a"):
                time.sleep(0.01)
                with phases("b"):  # inside "a": part of a's time
                    time.sleep(0.01)
        with phases("c"):  # not timed
            pass
    assert set(timer.laps) == {"time/a", "time/a_cpu"}
    assert timer.laps["time/a"] >= 0.04
    assert timer.total >= timer.laps["time/a"]


def test_an_observer_sees_the_phases_of_a_training_step_in_order_and_the_timer_reads_them(tiny_model,
                                                                                          char_tokenizer):
    cfg = compose(["method=oisd", "grpo.prompts_per_step=2", "grpo.num_generations=4", "grpo.micro_batch_size=4",
                   "grpo.max_completion_length=8", "log.gradient_view=true", "max_steps=1"])
    source = load_source(cfg.task)
    module = OISDModule(cfg, tiny_model, char_tokenizer, Sampler(cfg, tiny_model, char_tokenizer, source, source.reward),
                        on_log_step=lambda *_: {})
    recorder = _Recorder()
    module.phases.subscribe(recorder)
    rows = fit_rows(module, 1)

    micro_batch = [(1, "loss terms"), (1, "gradient view"), (1, "backward")]
    assert recorder.entered == [
        (0, "rollout"), (0, "rewards"), (0, "rewards"), (0, "old log-probs"), (0, "diagnostics"),
        (0, "policy step"), *micro_batch, *micro_batch, (1, "gradient view"), (1, "gradient view"),
        (1, "optimizer step")]
    assert {name for _, name in recorder.entered} <= set(PHASES)

    (row,) = rows
    outer = {name for depth, name in recorder.entered if depth == 0}
    timed = {k for k in row if k.startswith("time/") and k != "time/gradient_view"}
    assert timed == {f"{TIMED_PHASES[name]}{end}" for name in outer for end in ("", "_cpu")}
    for name in outer:  # the timer's window lies inside the recorder's, subscribed before it
        observed = sum(s for depth, n, s in recorder.seconds if depth == 0 and n == name)
        assert 0 < row[TIMED_PHASES[name]] <= observed
    inner = sum(s for depth, _, s in recorder.seconds if depth == 1)
    assert inner <= row["time/forward_backward"]
    assert row["step_time"] >= sum(row[TIMED_PHASES[name]] for name in outer)


def test_the_planner_runs_the_modules_own_step_through_its_phases():
    cfg = compose(["method=oisd", "accelerator=cpu", "log.gradient_view=true"])
    mc = load_model_config(cfg.model.name)
    module = build_module(cfg, build_policy(cfg, mc))
    opt = module.configure_optimizers()["optimizer"]
    recorder = _Recorder()
    module.phases.subscribe(recorder)
    parts = micro_batches(StepShape(8, 6, rows=4, micro_batch=2), mc.vocab_size)
    before = [p.detach().clone() for p in module.policy.parameters()]
    training_step(module, opt, parts, autocast_for(cfg), view=module.gradient_view())
    micro_batch = [(0, "loss terms"), (0, "gradient view"), (0, "backward")]
    assert recorder.entered == [*micro_batch, *micro_batch, (0, "gradient view"), (0, "optimizer step")]
    assert any(not torch.equal(a, p) for a, p in zip(before, module.policy.parameters(), strict=True))
