"""Named extension points: each policy loss, advantage estimator, reward function and alignment
channel is one entry, found by the name its config field holds (`grpo.loss_type`,
`grpo.advantage_estimator`, `grpo.reward_funcs`) or, for a channel, by its weight.

    from oisd_lab.registry import POLICY_LOSSES

    @POLICY_LOSSES.register("my_loss", aggregation="dapo")
    def my_loss(logps, ratio, advantages, options):
        ...  # -> (per-token loss, {"is_low_clipped", "is_high_clipped", "is_region_clipped"})

Registering is all a new entry needs: the config checks accept its name, the step calls it, and
its tests can train with it. Built-in entries are declared here by "module:function" and imported
on first use, so this module (and the config checks that read it) stays free of torch.

Signatures (docs/grpo-conventions.md):
- policy loss: fn(logps [B, T], ratio [B, T] or [B, 1], advantages [B], options) -> (loss [B, T]
  or broadcastable, info of boolean clip tensors); `options` is the GRPO config (any object with
  its attributes). Meta `aggregation`: the `losses.aggregate` normaliser of the loss;
  `reads_batch`: also called with `batch=` (mask, old_logps, is_weights); `own_is_weights`: the
  loss applies the sampler correction's weights itself, the step does not multiply them in.
- reward function: fn(completion text, answer, completion tokens, options) -> float. Meta
  `task_grader`: the trainer calls the task's own grader (fn(text, answer)) instead; `correct` is
  one (its entry, exact match, is what a caller without a task gets).
- advantage estimator: fn(rewards [B], lengths [B], num_generations, options) -> advantages [B],
  rows group-contiguous, lengths the completion tokens of each row. Meta `batch_level`: the
  estimator reads the whole step's batch (under data parallelism the module gathers every rank's
  rewards first).
- alignment channel: fn(outputs, part, objective, shared) -> {student layer k: per-token divergence
  [b, C] to the final layer} (`step.PolicyOutputs`, the micro-batch `Rollout`, `step.Objective`;
  `shared`: what the step's one pass over the vocabulary computed, "lens_jsd" for the logit lens).
  The objective adds `weight x` the channel's aggregated, advantage-weighted loss (`loss/<name>`)
  to the total. Meta `weight`: the `method.` field of its weight (None: `method.channel_weights`
  holds it under the channel's name); `weighting`: the `method.` field of its weighting (None or
  unset: `method.weighting`); `capture`: what the policy forward must keep for it, "lens" (the
  students' hidden states, read in the vocabulary pass), "hidden" (the students' hidden states)
  or "attention" (the attention rows of the students and the final layer).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Entry:
    name: str
    target: Callable | str
    meta: dict = field(default_factory=dict)

    def resolve(self) -> Callable:
        if isinstance(self.target, str):
            module, _, attr = self.target.partition(":")
            self.target = getattr(importlib.import_module(module), attr)
        return self.target


class Registry:
    """Name -> callable with metadata, for one kind of extension (`kind`), set by `field_name`."""

    def __init__(self, kind: str, field_name: str) -> None:
        self.kind, self.field_name = kind, field_name
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, target: Callable | str | None = None, **meta):
        """Add `name`; as a decorator when `target` is omitted. A name is registered once."""
        if name in self._entries:
            raise ValueError(f"{self.field_name}: {name!r} is already registered as a {self.kind}")

        def add(fn: Callable | str):
            self._entries[name] = Entry(name, fn, dict(meta))
            return fn

        return add if target is None else add(target)

    def unregister(self, name: str) -> None:
        self._entries.pop(name)

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def entry(self, name: str) -> Entry:
        if name not in self._entries:
            raise ValueError(f"{self.field_name}: unknown {self.kind} {name!r}; choose one of {self.names()}")
        return self._entries[name]

    def get(self, name: str) -> Callable:
        return self.entry(name).resolve()

    def meta(self, name: str, key: str, default=None):
        return self.entry(name).meta.get(key, default)


POLICY_LOSSES = Registry("policy loss", "grpo.loss_type")
REWARD_FUNCS = Registry("reward function", "grpo.reward_funcs")
ADVANTAGE_ESTIMATORS = Registry("advantage estimator", "grpo.advantage_estimator")
ALIGNMENT_CHANNELS = Registry("alignment channel", "method.channel_weights")
CAPTURES = ("lens", "hidden", "attention")  # what a channel's `capture` may name

for _name in ("dapo", "grpo", "dr_grpo", "bnpo", "luspo"):
    POLICY_LOSSES.register(_name, "oisd_lab.losses:clipped_policy_loss", aggregation=_name)
POLICY_LOSSES.register("cispo", "oisd_lab.losses:cispo_policy_loss", aggregation="dapo")
POLICY_LOSSES.register("sapo", "oisd_lab.losses:sapo_policy_loss", aggregation="grpo")
POLICY_LOSSES.register("vespo", "oisd_lab.losses:vespo_policy_loss", aggregation="dapo", reads_batch=True,
                       own_is_weights=True)

ADVANTAGE_ESTIMATORS.register("grpo", "oisd_lab.losses:grpo_estimator")
ADVANTAGE_ESTIMATORS.register("rloo", "oisd_lab.losses:rloo_estimator")
ADVANTAGE_ESTIMATORS.register("reinforce_plus_plus", "oisd_lab.losses:reinforce_plus_plus_estimator",
                              batch_level=True)
ADVANTAGE_ESTIMATORS.register("reinforce_plus_plus_baseline",
                              "oisd_lab.losses:reinforce_plus_plus_baseline_estimator", batch_level=True)

def channel_weight(method, name: str) -> float:
    """The configured weight of channel `name` in `method` (a `config.MethodConfig`), before the
    alignment schedule."""
    field_name = ALIGNMENT_CHANNELS.meta(name, "weight")
    if field_name is not None:
        return getattr(method, field_name)
    return float((getattr(method, "channel_weights", None) or {}).get(name, 0.0))


def channel_weighting(method, name: str) -> str:
    """The weighting of channel `name`: its own `method.` field when set, else `method.weighting`."""
    field_name = ALIGNMENT_CHANNELS.meta(name, "weighting")
    return (getattr(method, field_name) if field_name else None) or method.weighting


REWARD_FUNCS.register("correct", "oisd_lab.rewards:exact_match_reward", task_grader=True)
REWARD_FUNCS.register("format", "oisd_lab.rewards:format_reward")
REWARD_FUNCS.register("overlong", "oisd_lab.rewards:overlong_penalty")

ALIGNMENT_CHANNELS.register("think", "oisd_lab.step:think_divergence", weight="logit_weight",
                            weighting="think_weighting", capture="lens")
ALIGNMENT_CHANNELS.register("attn", "oisd_lab.step:attention_divergence", weight="attn_weight",
                            weighting="attn_weighting", capture="attention")
