"""The LightningModule: one GRPO(+OISD) step as data, wired from the pure pieces.

rollout -> rewards -> advantages -> per micro-batch: policy forward (hidden states of the student
layers, attention of student and final layers only) -> policy / think / attention losses, all
aggregated with the policy loss's normaliser -> backward -> one optimizer step. Every N steps:
per-layer diagnostics, completions and snapshots. The math lives in `losses.py`.

Positions: the logits at position t predict token t+1, so both alignment channels act on the
positions that produced the completion tokens (the last prompt position up to the one before the
last completion token); the completion mask is shifted accordingly.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_warn

from . import losses
from . import step as step_lib
from .config import TrainConfig
from .errors import NonFiniteError
from .lens import default_student_layer, find_readout, resolve_layers
from .optim import build_optimizer
from .rollout import Rollout, generate
from .run_hooks import PolicyView


class OISDModule(L.LightningModule):
    """GRPO with optional OISD alignment losses; presets only change the loss weights."""

    def __init__(self, cfg: TrainConfig, policy, tokenizer, task, reward_fn: Callable[[str, str], float],
                 format_prompt: Callable[[str], str] | None = None, ref_model=None, on_log_step=None,
                 sampler: Callable[[int, int, int], tuple[list, Rollout]] | None = None):
        super().__init__()
        self.cfg = cfg
        self.policy = policy
        self.tokenizer = tokenizer
        self.task = task
        self.reward_fn = reward_fn
        self.format_prompt = format_prompt or (lambda text: text)
        self._ref = [ref_model] if ref_model is not None else []  # a list keeps it out of state_dict
        self.on_log_step = on_log_step
        self.sampler = sampler or self._rollout
        """(step, rank, world) -> (problems, rollout); default: the task's prompts, sampled by the policy."""
        self.automatic_optimization = False
        self.readout = find_readout(policy)
        self.num_layers = self.readout.num_layers
        spec = cfg.method.layers or [default_student_layer(self.num_layers)]
        self.student_layers = resolve_layers(list(spec), self.num_layers)
        self.objective = step_lib.Objective(cfg.grpo, cfg.method, self.readout, tuple(self.student_layers))
        self.num_tokens = 0
        self.skipped_steps = 0

    # ---------------------------------------------------------------- optimisation
    def configure_optimizers(self):
        g = self.cfg.grpo
        opt = build_optimizer(self.policy.parameters(), g)
        warm = max(g.warmup_steps, 0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (warm + 1)) if warm else 1.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_train_start(self) -> None:
        self.policy.train()
        for ref in self._ref:
            ref.to(self.device).eval()

    def training_step(self, batch, batch_idx):
        step = self.global_step + 1  # the update this call produces (1-based, as in the tables)
        rank, world = self.global_rank, self.trainer.world_size
        torch.manual_seed(self.cfg.seed * 1_000_003 + step * 9_973 + rank)
        timer = _Timer()
        problems, rollout = self.sampler(step - 1, rank, world)
        timer.lap("time/rollout")
        G = self.cfg.grpo.num_generations
        rewards = torch.tensor([self._score(t, problems[i // G].answer) for i, t in enumerate(rollout.texts)],
                               dtype=torch.float32)
        adv = self._advantages(rewards)
        timer.lap("time/scoring")
        metrics = self._rollout_metrics(rollout, rewards)
        if self.on_log_step is not None and self._is_log_step(step):
            # before the update: the per-layer view of the policy that sampled this rollout
            metrics.update(self.on_log_step(self.policy_view(), step, problems, rollout, rewards, adv))
            timer.lap("time/diagnostics")
        metrics.update(self._optimise(rollout, adv.to(self.device)))
        timer.lap("time/forward_backward")
        metrics.update(timer.laps)
        metrics["step_time"] = timer.total
        for logger in self.loggers:  # direct: every row holds only this step's values
            logger.log_metrics(metrics, step=step)
        self.log("reward", metrics["reward"], prog_bar=True, logger=False, batch_size=1)

    def policy_view(self) -> PolicyView:
        """What a logging step may read: the policy, its readout and where to log tables."""
        return PolicyView(self.policy, self.readout, self.tokenizer, self.student_layers, self.device,
                          self.global_rank == 0, [lg for lg in self.loggers if isinstance(lg, WandbLogger)])

    def _is_log_step(self, step: int) -> bool:
        return step == 1 or step % self.cfg.log.every_n_steps == 0 or step == self.cfg.max_steps

    def _rollout(self, step: int, rank: int, world: int) -> tuple[list, Rollout]:
        g = self.cfg.grpo
        allp = self.task.train_batch(step, g.prompts_per_step * world, self.cfg.seed)
        problems = allp[rank * g.prompts_per_step : (rank + 1) * g.prompts_per_step]
        prompts = [self.format_prompt(p.prompt) for p in problems]
        if g.rollout_backend == "vllm":
            return problems, self._vllm_rollout(prompts)
        rollout = generate(self.policy, self.tokenizer, prompts, g.num_generations,
                           g.max_completion_length, g.temperature, g.top_p)
        return problems, rollout

    def _advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        """Group advantages of this rank's rows. `scale_rewards=batch` divides by the std of the
        whole step's rewards, so under DDP it is computed on all ranks' rewards (rank-major, the
        order in which prompts are sliced) and each rank keeps its own rows, as one process would."""
        g, world = self.cfg.grpo, self.trainer.world_size
        if world > 1 and g.scale_rewards == "batch":
            parts = [torch.zeros_like(rewards, device=self.device) for _ in range(world)]
            torch.distributed.all_gather(parts, rewards.to(self.device))
            everyone = torch.cat(parts).cpu()  # [world * B], rank-major
            adv = losses.group_advantages(everyone, g.num_generations, g.scale_rewards, g.adv_eps, g.std_ddof)
            B = rewards.numel()
            return adv[self.global_rank * B : (self.global_rank + 1) * B]
        return losses.group_advantages(rewards, g.num_generations, g.scale_rewards, g.adv_eps, g.std_ddof)

    def _vllm_rollout(self, prompts: list[str]) -> Rollout:
        """Sample with the colocated vLLM engine (built on first use), synced to the current weights."""
        from .rollout_vllm import VLLMRollout

        g = self.cfg.grpo
        if getattr(self, "_vllm", None) is None:
            self._vllm = VLLMRollout.for_policy(self.policy, self.tokenizer, g.vllm_gpu_memory_utilization,
                                                seed=self.cfg.seed * 1_000_003 + self.global_rank)
        if self._vllm.synced_version != self.global_step:
            self._vllm.sync_weights(self.policy.state_dict().items(), self.global_step)
        seed = int(torch.randint(0, 2**31 - 1, ()))  # from the per-step seeded generator
        return self._vllm.generate(prompts, g.num_generations, g.max_completion_length, g.temperature,
                                   g.top_p, seed=seed)

    def _score(self, text: str, answer: str) -> float:
        try:
            reward = float(self.reward_fn(text, answer))
        except Exception:  # a grader bug must not kill a long run; the completion scores 0
            return 0.0
        return reward if math.isfinite(reward) else 0.0  # a NaN reward would poison its whole group

    def normalisers(self, rollout: Rollout) -> dict:
        """Whole-batch normalisers so that micro-batch losses add up to the batch loss; under DDP
        the token count is averaged over ranks because gradients are averaged (as TRL does)."""
        tokens = rollout.completion_mask.sum()
        if self._trainer is not None and self.trainer.world_size > 1:
            tokens = self.trainer.strategy.reduce(tokens.to(self.device), reduce_op="mean")
        return dict(num_items_in_batch=tokens.clamp(min=1.0).to(self.device),
                    num_sequences=len(rollout),
                    max_completion_length=self.cfg.grpo.max_completion_length)

    def accumulate(self, rollout: Rollout, adv: torch.Tensor, backward=None) -> dict[str, torch.Tensor]:
        """Forward and backward of every micro-batch of one step: the gradient of the whole
        batch's loss accumulates in `.grad`. Returns the summed detached terms (no "loss/total").
        `backward` defaults to Lightning's `manual_backward` (precision plugins, DDP)."""
        backward = backward or self.manual_backward
        norm = self.normalisers(rollout)
        sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=self.device))
        for part, part_adv in self.micro_batches(rollout, adv):
            terms = self.loss_terms(part.to(self.device), part_adv, norm)
            backward(terms.pop("loss/total"))
            for key, value in terms.items():
                sums[key] = sums[key] + value.detach()
        return sums

    def _optimise(self, rollout: Rollout, adv: torch.Tensor) -> dict:
        opt, sched = self.optimizers(), self.lr_schedulers()
        opt.zero_grad(set_to_none=True)
        sums = self.accumulate(rollout, adv)
        grad_norm = self._clip_and_step(opt, sched)
        tokens = rollout.completion_mask.sum().clamp(min=1.0).to(self.device)
        out = {k: (v / tokens if k.startswith("sum/") else v) for k, v in sums.items()}
        out = {k.replace("sum/", ""): float(v) for k, v in out.items()}
        out["loss/total"] = self.objective.total(out)
        out.update(grad_norm=grad_norm, learning_rate=sched.get_last_lr()[0],
                   skipped_steps=float(self.skipped_steps))
        return out

    def micro_batches(self, rollout: Rollout, adv: torch.Tensor) -> list[tuple[Rollout, torch.Tensor]]:
        """The (rows, advantages) of each forward/backward pass of one optimisation step.

        Each micro-batch is trimmed to its longest completion, so rows are first sorted by
        completion length: micro-batches of similar lengths carry less padding. The normalisers
        are whole-batch, so the gradient is the same sum in another order. `bnpo` normalises per
        micro-batch, so its rows keep their order (as in TRL).
        """
        mb = self.cfg.grpo.micro_batch_size
        if mb < len(rollout) and self.cfg.grpo.loss_type != "bnpo":
            order = torch.argsort(rollout.completion_mask.sum(1), stable=True)
            rollout, adv = rollout.take(order), adv[order.to(adv.device)]
        return [(rollout.select(slice(lo, lo + mb)), adv[lo : lo + mb]) for lo in range(0, len(rollout), mb)]

    def _clip_and_step(self, opt, sched) -> float:
        max_norm = self.cfg.grpo.max_grad_norm or math.inf
        wrapped = self.trainer.model  # FSDP shards gradients: only its own method sees the global norm
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
        sched.step()
        return float(grad_norm)

    def loss_terms(self, part: Rollout, adv: torch.Tensor, norm: dict) -> dict[str, torch.Tensor]:
        """The loss terms of one micro-batch on the current policy (`step.loss_terms`)."""
        out = self.objective.forward(self.policy, part)
        ref = step_lib.reference_logps(self._ref[0], part, self.cfg.grpo.temperature) \
            if self.cfg.grpo.beta > 0 else None
        return step_lib.loss_terms(out, part, adv, norm, self.objective, ref_logps=ref)

    # ---------------------------------------------------------------- metrics
    def _rollout_metrics(self, rollout: Rollout, rewards: torch.Tensor) -> dict:
        G = self.cfg.grpo.num_generations
        lengths = rollout.completion_mask.sum(1)
        groups = rewards.view(-1, G)
        self.num_tokens += int(rollout.attention_mask.sum())
        return {
            "reward": float(rewards.mean()),
            "reward_std": float(groups.std(dim=1).mean()) if G > 1 else 0.0,
            "rewards/correct/mean": float(rewards.mean()),
            "frac_reward_zero_std": float((groups.std(dim=1) == 0).float().mean()),
            "completions/mean_length": float(lengths.mean()),
            "completions/max_length": float(lengths.max()),
            "completions/clipped_ratio": float(rollout.truncated.float().mean()),
            "num_tokens": float(self.num_tokens),
        }

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["oisd_counters"] = {"num_tokens": self.num_tokens, "skipped_steps": self.skipped_steps}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        counters = checkpoint.get("oisd_counters", {})
        self.num_tokens = counters.get("num_tokens", 0)
        self.skipped_steps = counters.get("skipped_steps", 0)


class _Timer:
    """Wall seconds per stage as `name`, process CPU seconds as `name_cpu`."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.last_cpu = time.process_time()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now, cpu = time.perf_counter(), time.process_time()
        self.laps[name], self.laps[f"{name}_cpu"] = now - self.last, cpu - self.last_cpu
        self.last, self.last_cpu = now, cpu

    @property
    def total(self) -> float:
        return time.perf_counter() - self.start
