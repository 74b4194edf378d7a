"""The LightningModule: one GRPO(+OISD) step as data, wired from the pure pieces.

rollout -> rewards -> advantages -> per micro-batch: policy forward (hidden states of the student
layers, attention of student and final layers only) -> policy / think / attention losses, all
aggregated with whole-batch normalisers (the alignment losses with the policy loss's normaliser
unless `method.align_loss_type` is set) -> backward -> one optimizer step. Every N steps:
per-layer diagnostics, completions and snapshots, and the gradient view (each term's gradient,
`gradient_view.py`). The math lives in `losses/`.

Positions: the logits at position t predict token t+1, so both alignment channels act on the
positions that produced the completion tokens (the last prompt position up to the one before the
last completion token). Those outputs are read one position early (`step.completion_positions`),
so column t of every [b, C] tensor belongs to completion token t and the completion mask is used
as it is, unshifted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_warn

from . import losses
from . import step as step_lib
from .config import TrainConfig
from .errors import NonFiniteError
from .gradient_view import GradientView, PreviousGradients
from .lens import find_readout, student_layers
from .optim import build_optimizer
from .phases import Phases, StepTimer
from .registry import ADVANTAGE_ESTIMATORS, ALIGNMENT_CHANNELS
from .rollout import Rollout
from .run_hooks import PolicyView
from .sampler import Sampler
from .sharding import fsdp_units, gathered

PHASES = ("rollout", "rewards", "dynamic sampling", "old log-probs", "diagnostics", "policy step", "loss terms",
          "gradient view", "backward", "optimizer step")
"""The phases `OISDModule.phases` opens, in the order of a step. A step that samples: "rollout"
(the sampler; again inside "dynamic sampling" for its further rounds), "rewards" (scoring and
advantages), "dynamic sampling" (`grpo.dynamic_sampling`), "old log-probs" (`_prepare`); on
logging steps "diagnostics" (the logging hook); then "policy step" (`optimise`), inside which
each micro-batch has "loss terms", "gradient view" (logging steps with `log.gradient_view`) and
"backward", then "gradient view" (its figures) and "optimizer step" (clipping, the update)."""
TIMED_PHASES = {"rollout": "time/rollout", "rewards": "time/scoring", "dynamic sampling": "time/dynamic_sampling",
                "old log-probs": "time/old_logps", "diagnostics": "time/diagnostics",
                "policy step": "time/forward_backward"}
"""Phase -> the step timer's metric (`phases.StepTimer`; wall seconds, `_cpu` for CPU seconds)."""


class OISDModule(L.LightningModule):
    """GRPO with optional OISD alignment losses; presets only change the loss weights."""

    def __init__(self, cfg: TrainConfig, policy, tokenizer, sampler: Sampler | None = None, ref_model=None,
                 on_log_step=None):
        super().__init__()
        self.cfg = cfg
        self.policy = policy
        self.tokenizer = tokenizer
        self._ref = [ref_model] if ref_model is not None else []  # a list keeps it out of state_dict
        self.on_log_step = on_log_step
        self.sampler = sampler
        """Where the rollouts come from and how they are scored (`sampler.Sampler`); None for a
        module that is only given rollouts (the memory planner's)."""
        self.automatic_optimization = False
        self.readout = find_readout(policy)
        self.num_layers = self.readout.num_layers
        self.student_layers = student_layers(cfg.method.layers, self.num_layers)
        self.base_objective = step_lib.Objective(cfg.grpo, cfg.method, self.readout, tuple(self.student_layers))
        self.objective = self.base_objective
        """This batch's objective (`objective_at`)."""
        self._held: tuple | None = None
        """(first step, [(problems, rollout, metrics) of each slice]) of the generation batch in use."""
        self.num_tokens = 0
        self.skipped_steps = 0
        self.entropy_control = {"coef": cfg.grpo.entropy_coef, "last_entropy": math.inf}
        """Adaptive entropy control's state (`grpo.use_adaptive_entropy`), kept in the checkpoints."""
        self.previous_gradients = PreviousGradients(cfg.log.gradient_view_sketch)
        """Each term's gradient on the last gradient-view step (`grad/<term>/cos_prev`); kept in the
        checkpoints (`on_save_checkpoint`), so a resumed run logs the same cos_prev."""
        self.phases = Phases()
        """The named phases of the step (`PHASES`), which observers subscribe to (`phases.py`): the
        step timer, the sampler (it counts the updates), the planner's measured peaks
        (`plan/run_hook.py`), the GPU check (`bench/gpu.py`)."""
        if sampler is not None:
            self.phases.subscribe(sampler.observe)

    # ---------------------------------------------------------------- optimisation
    def configure_optimizers(self):
        g = self.cfg.grpo
        opt = build_optimizer([p for p in self.policy.parameters() if p.requires_grad], g)
        warm = max(g.warmup_steps, 0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (warm + 1)) if warm else 1.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def configure_model(self) -> None:
        """Under `strategy=fsdp`, shard the policy per decoder layer (`sharding.py`)."""
        parallelize = getattr(self.trainer.strategy, "parallelize", None)
        if parallelize is not None:
            parallelize(self.policy)

    @property
    def reference_models(self) -> list:
        """The frozen reference policy of the KL term, in a list (empty when `grpo.beta` is 0)."""
        return self._ref

    def on_train_start(self) -> None:
        self.policy.train()
        for ref in self._ref:
            ref.to(self.device).eval()

    def training_step(self, batch, batch_idx):
        step = self.global_step + 1  # the update this call produces (1-based, as in the tables)
        torch.manual_seed(self.cfg.seed * 1_000_003 + step * 9_973 + self.global_rank)
        with self.phases.subscribed(StepTimer(TIMED_PHASES)) as timer:
            problems, rollout, metrics = self._batch_for(step)
            metrics = dict(metrics, iteration=float((step - self._held[0]) // self.cfg.grpo.steps_per_generation))
            if self.on_log_step is not None and self._is_log_step(step):
                # before the update: the per-layer view of the policy that sampled this rollout. Every
                # rank gathers the parameters (a collective), so rank 0's forwards need no other rank.
                with gathered(self.policy), self.phases("diagnostics"):
                    metrics.update(self.on_log_step(self.policy_view(), step, problems, rollout))
            on = self.device
            metrics.update(self.optimise(rollout.scored(rollout.advantages.to(on), rollout.rewards.to(on))))
        metrics.update(timer.laps)
        metrics["step_time"] = timer.total
        for logger in self.loggers:  # direct: every row holds only this step's values
            logger.log_metrics(metrics, step=step)
        self.log("reward", metrics["reward"], prog_bar=True, logger=False, batch_size=1)

    def _batch_for(self, step: int) -> tuple:
        """(problems, rollout with its rewards and advantages, rollout metrics) of this step. A generation
        batch is sampled every `grpo.num_iterations` x `grpo.steps_per_generation` steps (and after
        a resume) and reused until then: it is `steps_per_generation` slices of `prompts_per_step`
        prompts, step k of the cycle optimises slice k mod steps_per_generation, and the cycle goes
        through the slices num_iterations times. Its advantages are computed over the whole
        generation batch and its old log-probs once, before its first update. The policy of the
        loss (final layer, or BuPO's internal layer) is chosen per generation batch, so the old and
        new log-probs of a batch always come from the same head."""
        g = self.cfg.grpo
        slices, cycle = g.steps_per_generation, g.num_iterations * g.steps_per_generation
        if self._held is not None and step - self._held[0] < cycle:
            return self._held[1][(step - self._held[0]) % slices]
        self.objective = self.objective_at(step)
        first = (step - 1) // cycle * slices  # sampler batch index of the first slice
        sampled = [self._sampled(first + k) for k in range(slices)]
        if slices == 1:
            problems, rollout, per_func, _ = sampled[0]
        else:
            problems = [p for part in sampled for p in part[0]]
            rollout = Rollout.concat([part[1] for part in sampled], pad_id=self.tokenizer.pad_token_id or 0)
            per_func = torch.cat([part[2] for part in sampled])
        with self.phases("rewards"):
            rewards = per_func @ self._reward_weights
            adv = self._advantages(rewards, rollout.completion_mask.sum(1).cpu(), per_func)
        rows = [slice(k * len(rollout) // slices, (k + 1) * len(rollout) // slices) for k in range(slices)]
        metrics = [dict(self._rollout_metrics(rollout if slices == 1 else rollout.select(r), rewards[r], per_func[r]),
                        **self.sampler.memory, **part[3]) for r, part in zip(rows, sampled, strict=True)]
        with self.phases("old log-probs"):
            rollout, sampling = self._prepare(rollout.scored(adv, rewards))
        batches = [(problems, rollout, dict(metrics[0], **sampling))] if slices == 1 else [
            (problems[r.start // g.num_generations: r.stop // g.num_generations], rollout.select(r),
             dict(m, **sampling, generation_slice=float(k)))
            for k, (r, m) in enumerate(zip(rows, metrics, strict=True))]
        self._held = (step, batches)
        return batches[0]

    def _sampled(self, index: int) -> tuple:
        """(problems, rollout, per-function rewards [B, K], dynamic-sampling metrics) of sampler
        batch `index`."""
        if self.sampler is None:
            raise ValueError("this module has no sampler: give OISDModule a `sampler.Sampler` to train it")
        with self.phases("rollout"):
            problems, rollout = self.sampler(index, self.global_rank, self.trainer.world_size)
        with self.phases("rewards"):
            per_func = self.sampler.score(problems, rollout)
        if not self.cfg.grpo.dynamic_sampling:
            return problems, rollout, per_func, {}
        with self.phases("dynamic sampling"):  # further rounds: their sampling and scoring timed apart
            problems, rollout, per_func, dynamic = self._informative_groups(index, problems, rollout, per_func)
        return problems, rollout, per_func, dynamic

    @property
    def _reward_weights(self) -> torch.Tensor:
        w = self.cfg.grpo.reward_weights
        return torch.tensor(w if w is not None else [1.0] * len(self.cfg.grpo.reward_funcs), dtype=torch.float32)

    def _informative(self, per_func: torch.Tensor) -> torch.Tensor:
        """[groups] bool: the group's advantages are not all 0 (its weighted rewards differ; under
        normalize_then_sum, any one function's rewards differ)."""
        G = self.cfg.grpo.num_generations
        values = per_func if self.cfg.grpo.multi_objective_aggregation == "normalize_then_sum" else \
            (per_func @ self._reward_weights)[:, None]
        grouped = values.view(-1, G, values.shape[1])
        return (grouped != grouped[:, :1]).any(dim=2).any(dim=1)

    def _informative_groups(self, index: int, problems: list, rollout: Rollout, rewards: torch.Tensor) -> tuple:
        """DAPO's dynamic sampling (`grpo.dynamic_sampling`): keep the groups whose rewards differ,
        sample further rounds of new prompts (the sampler's `round`) until `prompts_per_step` of
        them are kept or `dynamic_sampling_max_rounds` rounds were made, then fill the rest with
        dropped groups. Under data parallelism every rank makes as many rounds as the rank that
        needs the most, so collective calls stay matched."""
        g, G = self.cfg.grpo, self.cfg.grpo.num_generations
        parts, kept, dropped, rounds = [(problems, rollout, rewards)], [], [], 1
        sampled = len(rollout)

        def sort(part: int) -> None:
            for i, informative in enumerate(self._informative(parts[part][2]).tolist()):
                (kept if informative else dropped).append((part, i))

        sort(0)
        while rounds < g.dynamic_sampling_max_rounds and self._any_rank(len(kept) < g.prompts_per_step):
            with self.phases("rollout"):
                more_problems, more = self.sampler(index, self.global_rank, self.trainer.world_size, round=rounds)
            with self.phases("rewards"):
                parts.append((more_problems, more, self.sampler.score(more_problems, more)))
            sampled += len(more)
            rounds += 1
            sort(len(parts) - 1)
        chosen = (kept + dropped)[: g.prompts_per_step]
        rollout = Rollout.concat([parts[p][1].take(torch.arange(i * G, (i + 1) * G)) for p, i in chosen],
                                 pad_id=self.tokenizer.pad_token_id or 0)
        problems = [parts[p][0][i] for p, i in chosen]
        rewards = torch.cat([parts[p][2][i * G:(i + 1) * G] for p, i in chosen])
        return problems, rollout, rewards, {
            "dynamic_sampling/rounds": float(rounds), "dynamic_sampling/rollouts_sampled": float(sampled),
            "dynamic_sampling/groups_dropped": float(len(dropped)),
            "dynamic_sampling/cap_hit": float(len(kept) < g.prompts_per_step)}

    @property
    def _distributed(self) -> bool:
        """Several ranks in an initialised process group (False in one process or without a trainer)."""
        return self._trainer is not None and self.trainer.world_size > 1 and torch.distributed.is_initialized()

    def _any_rank(self, flag: bool) -> bool:
        """`flag` on any rank (all ranks get the same answer); the flag itself in one process."""
        if not self._distributed:
            return flag
        value = torch.tensor([float(flag)], device=self.device)
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
        return bool(value.item())

    def objective_at(self, step: int) -> step_lib.Objective:
        """The step's objective: BuPO's internal policy (the student layer's lens) for its first
        `method.bupo_steps` steps, the final layer afterwards."""
        m = self.cfg.method
        steps = m.bupo_steps if m.bupo_steps >= 1 else math.ceil(m.bupo_steps * self.cfg.max_steps)
        layer = self.student_layers[0] if step <= steps else None
        return dataclasses.replace(self.base_objective, policy_layer=layer, policy_final_norm=m.bupo_final_norm)

    def _prepare(self, rollout: Rollout) -> tuple[Rollout, dict]:
        """Truncated completions masked out (when asked), the old log-probs (when the ratio can
        differ from 1: several iterations, or a sampler that is not the trainer's forward) and the
        sampler-mismatch weights."""
        g = self.cfg.grpo
        if g.mask_truncated_completions:
            rollout = rollout.without_truncated()
        correct = rollout.sampler_logps is not None and g.vllm_importance_sampling_correction
        if g.num_iterations == 1 and g.steps_per_generation == 1 and not correct:
            return rollout, {}  # old == current: the loss uses logps.detach(), no extra forward
        old = step_lib.old_policy_logps(self.policy, rollout.to(self.device), self.objective, g.micro_batch_size)
        rollout = dataclasses.replace(rollout, old_logps=old.to(rollout.completion_mask.device))
        if not correct:
            return rollout, {}
        weights, metrics = step_lib.sampler_correction(rollout, g)
        return dataclasses.replace(rollout, is_weights=weights), metrics

    def policy_view(self) -> PolicyView:
        """What a logging step may read: the policy, its readout and where to log tables."""
        return PolicyView(self.policy, self.readout, self.tokenizer, self.student_layers, self.device,
                          self.global_rank == 0, [lg for lg in self.loggers if isinstance(lg, WandbLogger)])

    def _is_log_step(self, step: int) -> bool:
        return step == 1 or step % self.cfg.log.every_n_steps == 0 or step == self.cfg.max_steps

    def _advantages(self, rewards: torch.Tensor, lengths: torch.Tensor, per_func: torch.Tensor | None = None
                    ) -> torch.Tensor:
        """Advantages of this rank's rows (`grpo.advantage_estimator`, completion lengths for the
        token-level ones). An estimator that reads the whole step's batch (`scale_rewards=batch`,
        REINFORCE++'s whitening) gets all ranks' rewards and lengths under DDP (rank-major, the
        order in which prompts are sliced) and each rank keeps its own rows, as one process would."""
        g, world = self.cfg.grpo, self.trainer.world_size
        if g.multi_objective_aggregation == "normalize_then_sum":  # GDPO: replaces the estimator
            everyone = self._all_ranks(per_func)
            adv = losses.normalize_then_sum_advantages(everyone, self._reward_weights, g.num_generations)
            B = rewards.numel()
            return adv[self.global_rank * B : (self.global_rank + 1) * B] if world > 1 else adv
        batch_level = g.scale_rewards == "batch" and g.advantage_estimator == "grpo" or \
            ADVANTAGE_ESTIMATORS.meta(g.advantage_estimator, "batch_level", False)
        if world > 1 and batch_level:
            everyone = [self._all_ranks(v) for v in (rewards, lengths.to(rewards.dtype))]
            adv = losses.advantages_of(everyone[0], everyone[1], g.num_generations, g)
            B = rewards.numel()
            return adv[self.global_rank * B : (self.global_rank + 1) * B]
        return losses.advantages_of(rewards, lengths, g.num_generations, g)

    def _all_ranks(self, values: torch.Tensor) -> torch.Tensor:
        """`values` of every rank, concatenated rank-major along dim 0 (itself in one process)."""
        if self.trainer.world_size <= 1:
            return values
        parts = [torch.zeros_like(values, device=self.device) for _ in range(self.trainer.world_size)]
        torch.distributed.all_gather(parts, values.to(self.device))
        return torch.cat(parts).cpu()

    def normalisers(self, rollout: Rollout) -> dict:
        """Whole-batch normalisers so that micro-batch losses add up to the batch loss; under DDP
        the token count is averaged over ranks because gradients are averaged (as TRL does).
        `bnpo` divides each micro-batch's token mean by the number of micro-batches (as TRL
        divides by its accumulation steps)."""
        tokens = rollout.completion_mask.sum()
        if self._trainer is not None and self.trainer.world_size > 1:
            tokens = self.trainer.strategy.reduce(tokens.to(self.device), reduce_op="mean")
        return dict(num_items_in_batch=tokens.clamp(min=1.0).to(self.device),
                    num_sequences=len(rollout),
                    max_completion_length=self.cfg.grpo.max_completion_length,
                    num_micro_batches=-(-len(rollout) // self.cfg.grpo.micro_batch_size))

    def accumulate(self, rollout: Rollout, backward=None, view: GradientView | None = None
                   ) -> dict[str, torch.Tensor]:
        """Forward and backward of every micro-batch of one step (a rollout with its advantages,
        and its rewards for the `reward` weighting): the gradient of the whole batch's loss
        accumulates in `.grad`. Returns the summed detached terms (no "loss/total").
        `backward` defaults to Lightning's `manual_backward` (precision plugins, DDP); `view`
        also collects each term's gradient (logging steps)."""
        return self.accumulate_micro_batches(self.micro_batches(rollout), self.normalisers(rollout), backward, view)

    def accumulate_micro_batches(self, parts: list[Rollout], norm: dict, backward=None,
                                 view: GradientView | None = None) -> dict[str, torch.Tensor]:
        """`accumulate` over given micro-batches (rollouts with their advantages), with
        the whole batch's normalisers `norm` (`normalisers`). Per micro-batch, the phases "loss
        terms", "gradient view" (with a view) and "backward". The memory planner runs this on the
        micro-batches of its planning rollout (`plan/trace.py`)."""
        backward = backward or self.manual_backward
        sums: dict[str, torch.Tensor] = {}
        for part in parts:
            with self.phases("loss terms"):
                terms = self.loss_terms(part.to(self.device), norm)
            if view is not None:
                with self.phases("gradient view"):
                    view.add(terms)
            with self.phases("backward"):
                backward(terms.pop("loss/total"))
            for key, value in terms.items():
                sums[key] = _combine(key, sums.get(key), value.detach())
        return sums

    def optimise(self, rollout: Rollout) -> dict:
        """The policy step on a rollout with its advantages (and rewards): forward, backward and
        optimiser step over the micro-batches; its metrics. The phase "policy step", with "loss
        terms", "gradient view", "backward" and "optimizer step" inside it (`PHASES`)."""
        with self.phases("policy step"):
            return self._optimise(rollout)

    def _optimise(self, rollout: Rollout) -> dict:
        opt, sched = self.optimizers(), self.lr_schedulers()
        opt.zero_grad(set_to_none=True)
        self.objective = self.objective.scheduled(self.global_step + 1)
        g, control = self.cfg.grpo, self.entropy_control
        if g.use_adaptive_entropy:  # TRL: applied only while the last step's entropy was at or below target
            applied = control["coef"] if control["last_entropy"] <= g.entropy_target else 0.0
            self.objective = dataclasses.replace(self.objective, entropy_coef=applied)
        viewed = self.cfg.log.gradient_view and self._is_log_step(self.global_step + 1)
        # under FSDP the view differentiates w.r.t. the gathered parameters, held for the whole step
        with gathered(self.policy, through_backward=True) if viewed else contextlib.nullcontext():
            view = self.gradient_view(opt, state_params=_optimised(opt, self.policy)) if viewed else None
            sums = self.accumulate(rollout, view=view)
        stats = {k: sums.pop(k) for k in list(sums) if k.startswith("stat/")}
        view_metrics = self.gradient_view_metrics(view, stats, rollout)
        grad_norm = self.clip_and_step(opt, sched)
        tokens = rollout.completion_mask.sum().clamp(min=1.0).to(self.device)
        out = {k: (v / tokens if k.startswith("sum/") else v) for k, v in sums.items()}
        out = {k.split("/", 1)[1] if k.startswith(_REDUCED) else k: float(v) for k, v in out.items()}
        out = {k: v if math.isfinite(v) else math.nan for k, v in out.items()}  # min/max of no token
        out["loss/total"] = self.objective.total(out)
        out.update(grad_norm=grad_norm, learning_rate=sched.get_last_lr()[0],
                   skipped_steps=float(self.skipped_steps), align_scale=self.objective.align_scale)
        if g.use_adaptive_entropy:
            out.update(entropy_coef_applied=self.objective.entropy_bonus,
                       entropy_coef=self._adapt_entropy_coef(sums["sum/entropy"], tokens))
        out.update(view_metrics)
        return out

    def _adapt_entropy_coef(self, entropy_sum: torch.Tensor, tokens: torch.Tensor) -> float:
        """TRL's controller after a step: the step's mean token entropy over all ranks, the
        coefficient moved by entropy_coef_delta toward more bonus when it is at or below the target."""
        g, control = self.cfg.grpo, self.entropy_control
        both = torch.stack([entropy_sum.detach().float().to(self.device), tokens.float()])
        if self._distributed:
            torch.distributed.all_reduce(both)
        entropy = float(both[0] / both[1].clamp(min=1.0))
        step = g.entropy_coef_delta if entropy <= g.entropy_target else -g.entropy_coef_delta
        control["coef"] = min(max(control["coef"] + step, g.entropy_coef_min), g.entropy_coef_max)
        control["last_entropy"] = entropy
        return control["coef"]

    def gradient_view(self, optimizer=None, state_params=None, derive_policy: bool | None = None
                      ) -> GradientView | None:
        """A collector of each term's gradient for this step (`log.gradient_view`), or None.
        optimizer (Lightning's wrapper or the torch optimizer): its state, read before this step's
        update, gives the AdamW view; None leaves it out. state_params: the parameters the
        optimizer holds, in the order of `policy.parameters()` (under FSDP the shards, while the
        view differentiates w.r.t. the gathered parameters); default: the same parameters.
        derive_policy: whether the policy term is `.grad` minus the others (default: where that is
        exact, decided from the trainer; the planner says it for the run it plans)."""
        if not self.cfg.log.gradient_view:
            return None
        weights = {"policy": 1.0, **{name: self.objective.weight(name) for name in ALIGNMENT_CHANNELS.names()}}
        # .grad is this process's unscaled sum unless DDP averages it, a GradScaler scales it or
        # FSDP moves it to the shards (under FSDP the parameters here are the gathered ones, inside
        # `gathered(..., through_backward=True)`)
        plain = self._trainer is None or (self.trainer.world_size == 1 and not fsdp_units(self.policy) and
                                          getattr(self.trainer.precision_plugin, "scaler", None) is None)
        plain = plain if derive_policy is None else derive_policy
        return GradientView([p for p in self.policy.parameters() if p.requires_grad], weights, derive_policy=plain,
                            optimizer=getattr(optimizer, "optimizer", optimizer), previous=self.previous_gradients,
                            state_params=state_params)

    def gradient_view_metrics(self, view: GradientView | None, stats: dict, rollout: Rollout) -> dict:
        """The `grad/*` metrics of a finished accumulation over `rollout` (with its advantages);
        empty without a view."""
        if view is None:
            return {}
        self.finish_gradient_view(view)
        with self.phases("gradient view"):
            adv = rollout.advantages
            lengths = rollout.completion_mask.sum(1).to(adv.device)
            if self._distributed:
                # the divergence sums by advantage sign and the batch's advantages: the whole step's, all ranks
                keys = sorted(stats)
                summed = torch.stack([stats[k].detach().float().to(self.device) for k in keys])
                torch.distributed.all_reduce(summed)
                stats = dict(zip(keys, summed, strict=True))
                adv, lengths = self._all_ranks(adv.detach().float()), self._all_ranks(lengths.float())
            return view.metrics(stats, adv, lengths, self.cfg.grpo.num_generations)

    def finish_gradient_view(self, view: GradientView | None) -> None:
        """After the last micro-batch: the view's derived terms (`GradientView.finish`), averaged
        over ranks; the phase "gradient view"."""
        if view is None:
            return
        with self.phases("gradient view"):
            view.finish([p.grad for p in view.params])
            view.average_over_ranks()  # global figures under DDP and FSDP

    def micro_batches(self, rollout: Rollout) -> list[Rollout]:
        """The rows (with their advantages and rewards) of each forward/backward pass of one
        optimisation step.

        Each micro-batch is trimmed to its longest completion, so rows are first sorted by
        completion length: micro-batches of similar lengths carry less padding. The normalisers
        are whole-batch, so the gradient is the same sum in another order. `bnpo` normalises per
        micro-batch, so its rows keep their order (as in TRL).
        """
        mb = self.cfg.grpo.micro_batch_size
        if mb < len(rollout) and self.cfg.grpo.loss_type != "bnpo":
            rollout = rollout.take(torch.argsort(rollout.completion_mask.sum(1), stable=True))
        return [rollout.select(slice(lo, lo + mb)) for lo in range(0, len(rollout), mb)]

    def clip_and_step(self, opt, sched=None) -> float:
        """Clip the accumulated gradient to `grpo.max_grad_norm`, step the optimizer (skipping a
        non-finite gradient as `grpo.nonfinite` says) and the scheduler (if any); the phase
        "optimizer step". Returns the gradient's norm before clipping."""
        with self.phases("optimizer step"):
            return self._clip_and_step(opt, sched)

    def _clip_and_step(self, opt, sched) -> float:
        max_norm = self.cfg.grpo.max_grad_norm or math.inf
        # FSDP shards gradients: only its own method sees the global norm
        wrapped = self.trainer.model if self._trainer is not None else self.policy
        if type(wrapped).__name__ == "FullyShardedDataParallel":
            grad_norm = wrapped.clip_grad_norm_(max_norm)
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), max_norm)
        if not torch.isfinite(grad_norm):
            step = self.global_step + 1
            if self.cfg.grpo.nonfinite == "stop":
                raise NonFiniteError(f"grpo.nonfinite: gradient norm is {float(grad_norm)} at step {step}; "
                                     "the run stops here (grpo.nonfinite=skip skips such steps)")
            self.skipped_steps += 1
            rank_zero_warn(f"step {step}: gradient norm is {float(grad_norm)}; update skipped "
                           f"({self.skipped_steps} skipped so far)")
            if getattr(self.trainer.precision_plugin, "scaler", None) is None:
                # torch optimizers skip parameters whose grad is None: no decay, no moment update.
                # opt.step() still runs so that Lightning counts the step (global_step, the
                # prompts and the seeds of the next step advance).
                opt.zero_grad(set_to_none=True)
            # with a GradScaler (16-mixed) the scaler itself skips a non-finite step
        opt.step()
        if sched is not None:
            sched.step()
        return float(grad_norm)

    def loss_terms(self, part: Rollout, norm: dict) -> dict[str, torch.Tensor]:
        """The loss terms of one micro-batch (with its advantages) on the current policy
        (`step.loss_terms`)."""
        out = self.objective.forward(self.policy, part)
        ref = step_lib.reference_logps(self._ref[0], part, self.cfg.grpo.temperature, self.cfg.grpo.shared_prompt) \
            if self.cfg.grpo.beta > 0 else None
        return step_lib.loss_terms(out, part, norm, self.objective, ref_logps=ref)

    # ---------------------------------------------------------------- metrics
    def _rollout_metrics(self, rollout: Rollout, rewards: torch.Tensor, per_func: torch.Tensor) -> dict:
        G = self.cfg.grpo.num_generations
        lengths = rollout.completion_mask.sum(1)
        groups = rewards.view(-1, G)
        self.num_tokens += int(rollout.attention_mask.sum())
        per_reward = {}
        for k, name in enumerate(self.cfg.grpo.reward_funcs):
            per_reward[f"rewards/{name}/mean"] = float(per_func[:, k].mean())
            if len(self.cfg.grpo.reward_funcs) > 1:
                per_reward[f"rewards/{name}/std"] = float(per_func[:, k].std()) if len(per_func) > 1 else 0.0
        return {
            "reward": float(rewards.mean()),
            "reward_std": float(groups.std(dim=1).mean()) if G > 1 else 0.0,
            **per_reward,
            "frac_reward_zero_std": float((groups.std(dim=1) == 0).float().mean()),
            "completions/mean_length": float(lengths.mean()),
            "completions/max_length": float(lengths.max()),
            "completions/clipped_ratio": float(rollout.truncated.float().mean()),
            "num_tokens": float(self.num_tokens),
        }

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["oisd_counters"] = {"num_tokens": self.num_tokens, "skipped_steps": self.skipped_steps}
        checkpoint["oisd_entropy_control"] = dict(self.entropy_control)
        # the last gradient-view step's (sketched) term gradients, so a resumed run logs cos_prev as
        # an uninterrupted one does
        checkpoint["oisd_previous_gradients"] = dict(self.previous_gradients.last)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        counters = checkpoint.get("oisd_counters", {})
        self.num_tokens = counters.get("num_tokens", 0)
        self.skipped_steps = counters.get("skipped_steps", 0)
        self.entropy_control.update(checkpoint.get("oisd_entropy_control", {}))
        self.previous_gradients.last = dict(checkpoint.get("oisd_previous_gradients", {}))


_REDUCED = ("sum/", "min/", "max/")


def _combine(key: str, total: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    """Micro-batch terms into step terms: "min/..." by minimum, "max/..." by maximum, else a sum."""
    if total is None:
        return value
    if key.startswith("min/"):
        return torch.minimum(total, value)
    if key.startswith("max/"):
        return torch.maximum(total, value)
    return total + value


def _optimised(optimizer, policy) -> list | None:
    """The optimizer's parameters (shards under FSDP), one per trainable parameter of `policy` in
    its order (gathered ones inside `gathered`), or None where they do not pair up in order
    and shape (DTensor shards report the full shape)."""
    optimizer = getattr(optimizer, "optimizer", optimizer)
    held = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    current = [p for p in policy.parameters() if p.requires_grad]
    if len(held) != len(current) or any(a.shape != b.shape for a, b in zip(held, current, strict=True)):
        return None
    return held
