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

import contextlib
import math
import time
from collections import defaultdict
from collections.abc import Callable

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from . import losses
from .attention import AttentionCapture
from .config import TrainConfig
from .errors import NonFiniteError
from .lens import default_student_layer, find_readout, resolve_layers
from .rollout import Rollout, generate

VOCAB_CHUNK_ELEMENTS = 1 << 24
"""Rows x vocabulary of one block of vocabulary-sized work (64 MiB in float32): the log-probs,
the entropy and the lens chunks (there also capped by `method.chunk_size` tokens), so that a
150k vocabulary stays within a few such blocks and a tiny one runs in a single block."""


ATTN_ROW_BLOCK = 64
"""Completion rows per block of the attention alignment (each block reads only the keys it can see)."""


class OISDModule(L.LightningModule):
    """GRPO with optional OISD alignment losses; presets only change the loss weights."""

    def __init__(self, cfg: TrainConfig, policy, tokenizer, task, reward_fn: Callable[[str, str], float],
                 format_prompt: Callable[[str], str] | None = None, ref_model=None, on_log_step=None):
        super().__init__()
        self.cfg = cfg
        self.policy = policy
        self.tokenizer = tokenizer
        self.task = task
        self.reward_fn = reward_fn
        self.format_prompt = format_prompt or (lambda text: text)
        self._ref = [ref_model] if ref_model is not None else []  # a list keeps it out of state_dict
        self.on_log_step = on_log_step
        self.automatic_optimization = False
        self.readout = find_readout(policy)
        self.num_layers = self.readout.num_layers
        spec = cfg.method.layers or [default_student_layer(self.num_layers)]
        self.student_layers = resolve_layers(list(spec), self.num_layers)
        self.num_tokens = 0
        self.skipped_steps = 0

    # ---------------------------------------------------------------- optimisation
    def configure_optimizers(self):
        g = self.cfg.grpo
        opt = torch.optim.AdamW(self.policy.parameters(), lr=g.lr, weight_decay=g.weight_decay)
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
        problems, rollout = self._rollout(step - 1, rank, world)
        timer.lap("time/rollout")
        G = self.cfg.grpo.num_generations
        rewards = torch.tensor([self._score(t, problems[i // G].answer) for i, t in enumerate(rollout.texts)],
                               dtype=torch.float32)
        adv = self._advantages(rewards)
        timer.lap("time/scoring")
        metrics = self._rollout_metrics(rollout, rewards)
        if self.on_log_step is not None and self._is_log_step(step):
            # before the update: the per-layer view of the policy that sampled this rollout
            metrics.update(self.on_log_step(self, step, problems, rollout, rewards, adv))
            timer.lap("time/diagnostics")
        metrics.update(self._optimise(rollout, adv.to(self.device)))
        timer.lap("time/forward_backward")
        metrics.update(timer.laps)
        metrics["step_time"] = timer.total
        for logger in self.loggers:  # direct: every row holds only this step's values
            logger.log_metrics(metrics, step=step)
        self.log("reward", metrics["reward"], prog_bar=True, logger=False, batch_size=1)

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

    def _normalisers(self, rollout: Rollout) -> dict:
        """Whole-batch normalisers so that micro-batch losses add up to the batch loss; under DDP
        the token count is averaged over ranks because gradients are averaged (as TRL does)."""
        tokens = rollout.completion_mask.sum()
        if self.trainer.world_size > 1:
            tokens = self.trainer.strategy.reduce(tokens.to(self.device), reduce_op="mean")
        return dict(num_items_in_batch=tokens.clamp(min=1.0).to(self.device),
                    num_sequences=len(rollout),
                    max_completion_length=self.cfg.grpo.max_completion_length)

    def _optimise(self, rollout: Rollout, adv: torch.Tensor) -> dict:
        opt, sched = self.optimizers(), self.lr_schedulers()
        opt.zero_grad(set_to_none=True)
        norm = self._normalisers(rollout)
        sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=self.device))
        for part, part_adv in self.micro_batches(rollout, adv):
            terms = self._loss_terms(_to(part, self.device), part_adv, norm)
            self.manual_backward(terms.pop("loss/total"))
            for key, value in terms.items():
                sums[key] = sums[key] + value.detach()
        grad_norm = self._clip_and_step(opt, sched)
        tokens = rollout.completion_mask.sum().clamp(min=1.0).to(self.device)
        out = {k: (v / tokens if k.startswith("sum/") else v) for k, v in sums.items()}
        out = {k.replace("sum/", ""): float(v) for k, v in out.items()}
        out["loss/total"] = out["loss/policy"] + self.cfg.method.logit_weight * out.get("loss/think", 0.0) \
            + self.cfg.method.attn_weight * out.get("loss/attn", 0.0)
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

    # ---------------------------------------------------------------- losses
    def _loss_terms(self, part: Rollout, adv: torch.Tensor, norm: dict) -> dict[str, torch.Tensor]:
        cfg_g, cfg_m = self.cfg.grpo, self.cfg.method
        P, mask = part.prompt_length, part.completion_mask
        C = mask.shape[1]
        attn_on = cfg_m.attn_weight > 0
        capture = [layer - 1 for layer in self.student_layers] + [self.num_layers - 1] if attn_on else []
        ctx = AttentionCapture(self.policy, capture) if attn_on else contextlib.nullcontext()
        # Only the C positions that predict completion tokens reach the unembedding: no [b, C+1, V]
        # tensor to slice (and to zero-fill again in backward).
        keep = torch.arange(P - 1, P - 1 + C, device=part.input_ids.device)
        with ctx as cap:
            out = self.policy(input_ids=part.input_ids, attention_mask=part.attention_mask,
                              output_hidden_states=cfg_m.logit_weight > 0, logits_to_keep=keep,
                              use_cache=False)
        logits = out.logits  # [b, C, V]: position P-1+t predicts completion token t
        ids = part.completion_ids
        rows = max(1, VOCAB_CHUNK_ELEMENTS // logits.shape[-1])  # [rows, V] blocks of vocabulary work
        logps = losses.token_logps(logits, ids, cfg_g.temperature, chunk_size=rows)
        per_tok, clip = losses.clipped_surrogate(logps, logps.detach(), adv, cfg_g.epsilon_low, cfg_g.epsilon_high)
        terms: dict[str, torch.Tensor] = {}
        if cfg_g.beta > 0:
            kl = losses.kl_k3(logps, self._ref_logps(part, C))
            per_tok = per_tok + cfg_g.beta * kl
            terms["sum/kl"] = (kl.detach() * mask).sum()
        agg = dict(loss_type=cfg_g.loss_type, **norm)
        terms["loss/policy"] = losses.aggregate(per_tok, mask, **agg)
        total = terms["loss/policy"]
        if cfg_m.logit_weight > 0:
            terms["loss/think"] = self._think_loss(out.hidden_states, logits, mask, adv, P, agg)
            total = total + cfg_m.logit_weight * terms["loss/think"]
        if attn_on:
            terms["loss/attn"] = self._attn_loss(cap, part, adv, agg)
            total = total + cfg_m.attn_weight * terms["loss/attn"]
        with torch.no_grad():
            ent = losses.entropy_from_logits(logits.detach(), chunk_size=rows, temperature=cfg_g.temperature)
            terms["sum/entropy"] = (ent * mask).sum()
            for name in ("low", "high", "region"):
                terms[f"sum/clip_ratio/{name}_mean"] = (clip[f"is_{name}_clipped"].float() * mask).sum()
        terms["loss/total"] = total
        return terms

    def _think_loss(self, hidden_states, logits, mask, adv, P, agg) -> torch.Tensor:
        m, sel = self.cfg.method, mask.bool()
        C = mask.shape[1]
        # The final layer is the detached teacher; its rows are read chunk by chunk at the
        # completion tokens, never copied out as a whole [N, V] tensor.
        index = sel.nonzero(as_tuple=True)
        chunk = max(1, min(m.chunk_size, VOCAB_CHUNK_ELEMENTS // logits.shape[-1]))
        total = torch.zeros((), device=logits.device)
        for layer in self.student_layers:
            h = hidden_states[layer][:, P - 1 : P - 1 + C][sel]  # [N, D]
            div = losses.chunked_lens_jsd(h, logits, self.readout.for_layer(layer, m.lens_grad),
                                          m.jsd_beta, m.jsd_temperature, chunk, teacher_index=index)
            per_tok = torch.zeros_like(mask).masked_scatter(sel, div)
            total = total + losses.alignment_loss(per_tok, mask, adv, m.weighting, **agg)
        return total / len(self.student_layers)

    def _attn_loss(self, cap: AttentionCapture, part: Rollout, adv, agg) -> torch.Tensor:
        m, mask = self.cfg.method, part.completion_mask
        P, C = part.prompt_length, mask.shape[1]
        keys = part.attention_mask.bool()
        per_tok: dict[int, list[torch.Tensor]] = {layer: [] for layer in self.student_layers}
        # Blocks of completion rows: causal row P-1+t attends to keys 0..P-1+t only, so a block
        # ending at row P-2+hi needs just the first P-1+hi keys (exact; the rest have probability 0).
        for lo in range(0, C, ATTN_ROW_BLOCK):
            hi = min(lo + ATTN_ROW_BLOCK, C)
            rows, width = slice(P - 1 + lo, P - 1 + hi), P - 1 + hi
            with torch.no_grad():  # the teacher is detached: build no graph for its rows
                teacher = cap.probs_for(self.num_layers - 1, rows, keys=width)  # [b, H, hi-lo, width]
            for layer in self.student_layers:
                student = cap.probs_for(layer - 1, rows, keys=width)
                per_tok[layer].append(losses.attention_row_jsd(
                    teacher, student, query_mask=mask[:, lo:hi].bool(), key_mask=keys[:, :width],
                    head_reduce=m.attn_heads, exclude_sink=m.attn_exclude_sink))
        total = torch.zeros((), device=mask.device)
        for layer in self.student_layers:
            total = total + losses.alignment_loss(torch.cat(per_tok[layer], dim=1), mask, adv, m.weighting, **agg)
        return total / len(self.student_layers)

    @torch.no_grad()
    def _ref_logps(self, part: Rollout, C: int) -> torch.Tensor:
        out = self._ref[0](input_ids=part.input_ids, attention_mask=part.attention_mask,
                           logits_to_keep=C + 1, use_cache=False)
        return losses.token_logps(out.logits[:, :-1], part.completion_ids, self.cfg.grpo.temperature)

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


def _to(part: Rollout, device) -> Rollout:
    if part.input_ids.device == torch.device(device):
        return part
    return Rollout(part.input_ids.to(device), part.attention_mask.to(device), part.completion_mask.to(device),
                   part.prompt_length, part.texts, part.truncated.to(device))


class _Timer:
    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = now - self.last
        self.last = now

    @property
    def total(self) -> float:
        return time.perf_counter() - self.start
