"""Where a run's rollouts come from: the task's prompts, sampled by the policy, scored.

`Sampler` is built once per run (`train.py`) and handed to `OISDModule`, which calls it as

    sampler(index, rank, world, round=0) -> (problems, Rollout)

for this rank's prompts of sampler batch `index` and their `grpo.num_generations` completions
each (rows group-contiguous), and `sampler.score(problems, rollout)` for each completion's
rewards. The module then weighs the rewards, computes the advantages and stores both on the
`Rollout` (`Rollout.scored`).

Sampling is our own decoding loop (`rollout.generate`) or, with `grpo.rollout_backend=vllm`, a
colocated vLLM engine that is given the policy's weights again after every update. Another source
of rollouts (a fixed batch, a perturbed copy of the policy, a global batch split over ranks) is
a `draw` function of the same signature as the call.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch

from .config import TrainConfig
from .registry import REWARD_FUNCS
from .rollout import Rollout, generate
from .sharding import gathered

Draw = Callable[..., tuple[list, Rollout]]
"""(batch index, rank, world, round=0) -> (problems, rollout)."""


class Sampler:
    """The task's prompts (`task.train_batch`), each formatted by `format_prompt`, sampled by
    `policy` and scored by the task's grader `reward` (text, answer) -> float and the registered
    `grpo.reward_funcs`.

    A generation batch is `grpo.steps_per_generation` sampler batches and serves
    `num_iterations x steps_per_generation` steps (`OISDModule`); with both 1, batch index =
    step - 1. `round` > 0 (dynamic sampling, `grpo.dynamic_sampling`) draws further prompts for
    the same batch, from a seed of its own. `draw` replaces the sampling (the prompts, the policy
    and the backend) and keeps the scoring.
    """

    def __init__(self, cfg: TrainConfig, policy, tokenizer, task=None, reward: Callable[[str, str], float] | None = None,
                 format_prompt: Callable[[str], str] | None = None, draw: Draw | None = None):
        self.cfg = cfg
        self.policy = policy
        self.tokenizer = tokenizer
        self.task = task
        self.reward = reward
        self.format_prompt = format_prompt or (lambda text: text)
        self.draw: Draw = draw or self.sample
        """What `__call__` runs: `sample` unless another draw was given."""
        self.engine = None
        """The colocated vLLM engine (`grpo.rollout_backend=vllm`), built on first use."""
        self.memory: dict[str, float] = {}
        """The vLLM engine's memory (`VLLMRollout.memory`), logged with the rollout metrics; empty
        for our decoding loop."""
        self.updates = 0
        """Policy updates seen (`observe`); the engine is given the weights when its version differs."""

    def __call__(self, index: int, rank: int, world: int, round: int = 0) -> tuple[list, Rollout]:
        """This rank's problems of sampler batch `index` and their rollout."""
        return self.draw(index, rank, world, round=round) if round else self.draw(index, rank, world)

    def problems(self, index: int, rank: int, world: int, round: int = 0) -> list:
        """This rank's slice of the `prompts_per_step x world` problems of batch `index`."""
        g = self.cfg.grpo
        every = self.task.train_batch(index, g.prompts_per_step * world, self.cfg.seed + round * 7_919)
        return every[rank * g.prompts_per_step: (rank + 1) * g.prompts_per_step]

    def sample(self, index: int, rank: int, world: int, round: int = 0) -> tuple[list, Rollout]:
        """The built-in draw: this rank's problems, formatted, sampled by the policy."""
        g = self.cfg.grpo
        problems = self.problems(index, rank, world, round)
        prompts = [self.format_prompt(p.prompt) for p in problems]
        if g.rollout_backend == "vllm":
            return problems, self.sample_vllm(prompts, rank)
        with gathered(self.policy):  # one all-gather per rollout under FSDP
            rollout = generate(self.policy, self.tokenizer, prompts, g.num_generations,
                               g.max_completion_length, g.temperature, g.top_p, top_k=g.top_k, min_p=g.min_p,
                               repetition_penalty=g.repetition_penalty)
        return problems, rollout

    def sample_vllm(self, prompts: list[str], rank: int = 0) -> Rollout:
        """Sample with the colocated vLLM engine (built on first use, its memory kept in `memory`),
        after pushing the current weights into it when an update happened since the last push."""
        # on use: vLLM is an optional extra
        from .rollout_vllm import VLLMRollout

        g = self.cfg.grpo
        if self.engine is None:
            self.engine = VLLMRollout.for_policy(self.policy, self.tokenizer, g.vllm_gpu_memory_utilization,
                                                 seed=self.cfg.seed * 1_000_003 + rank,
                                                 cpu_kv_cache_gib=g.vllm_cpu_kv_cache_gib,
                                                 engine_kwargs=dict(g.vllm_engine_kwargs))
            self.memory = self.engine.memory()
        if self.engine.synced_version != self.updates:
            self.engine.sync_weights(self.policy.state_dict().items(), self.updates)
        seed = int(torch.randint(0, 2**31 - 1, ()))  # from the per-step seeded generator
        return self.engine.generate(prompts, g.num_generations, g.max_completion_length, g.temperature,
                                    g.top_p, seed=seed, top_k=g.top_k, min_p=g.min_p,
                                    repetition_penalty=g.repetition_penalty)

    def observe(self, phase: str) -> None:
        """An observer of the module's phases (`phases.py`): counts the policy's updates (the
        phase "optimizer step"), after which the vLLM engine needs the weights again."""
        if phase == "optimizer step":
            self.updates += 1

    def score(self, problems: list, rollout: Rollout) -> torch.Tensor:
        """[B, K]: every completion scored by each of `grpo.reward_funcs` (the task's grader for
        the ones registered as `task_grader`)."""
        g, G = self.cfg.grpo, self.cfg.grpo.num_generations
        lengths = rollout.completion_mask.sum(1).tolist()
        fns = [None if REWARD_FUNCS.meta(name, "task_grader", False) else
               functools.partial(REWARD_FUNCS.get(name), options=g) for name in g.reward_funcs]
        return torch.tensor([[self.reward_of(t, problems[i // G].answer, fn, int(lengths[i])) for fn in fns]
                             for i, t in enumerate(rollout.texts)], dtype=torch.float32).view(len(rollout), -1)

    def reward_of(self, text: str, answer: str, fn=None, length: int = 0) -> float:
        """One reward: the task's grader (fn None), or a registered function of (text, answer,
        length). A grader that raises or returns a non-finite value scores 0: a grader bug must
        not stop a long run, and a NaN would poison its whole group."""
        try:
            reward = float(self.reward(text, answer) if fn is None else fn(text, answer, length))
        except Exception:
            return 0.0
        return reward if math.isfinite(reward) else 0.0


__all__ = ["Draw", "Sampler"]
