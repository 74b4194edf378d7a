"""One training run, start to end: check the input, load the starting policy, evaluate it, train
(or resume), save the trained policy and evaluate it again.

The housekeeping each step relies on lives in `oisd_lab.run`: the folder layout (`run.folder`),
evaluation, tracking, checkpoints and the Lightning Trainer.
"""

from __future__ import annotations

import copy
import json
import time
import uuid
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from . import lora
from .config import TrainConfig, to_yaml
from .files import truncate_jsonl
from .module import OISDModule
from .preflight import preflight
from .pretrain import cache_root, warm_start
from .run import evaluation
from .run.checkpointing import find_resumable
from .run.folder import RunDir, default_run_dir
from .run.loading import load_start
from .run.quiet import quiet
from .run.tracking import TableLogger, close_loggers, environment_info, make_wandb_logger
from .run.trainer import (
    checkpoint_step,
    enable_checkpointing,
    launched_rank,
    make_trainer,
    unsharded_policy,
)
from .run_hooks import LogStepHook
from .sampler import Sampler


def train(cfg: TrainConfig, log=print) -> Path:
    """Run (or resume) one training run; returns its run directory."""
    quiet()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    run = RunDir(Path(cfg.run_dir) if cfg.run_dir else default_run_dir(cfg.task.name, cfg.method.name, cfg.seed))
    cfg.run_dir = str(run.root)
    source = preflight(cfg)  # bad input (task, model, layers, run_dir) fails before anything is written
    start_dir = warm_start(cfg, log=log)
    L.seed_everything(cfg.seed, workers=False, verbose=False)
    model, tokenizer = load_start(cfg, start_dir)  # a damaged checkpoint fails before the run dir exists
    if cfg.model.lora_rank:  # zero-initialised adapters: the same outputs as the start
        model = lora.attach(model, cfg.model.lora_rank, cfg.model.lora_alpha, cfg.model.lora_dropout,
                            cfg.model.lora_targets)
    run.root.mkdir(parents=True, exist_ok=True)
    found = find_resumable(run.checkpoints)
    resume = found.path if found else None
    run_id = _open(run, cfg)
    if cfg.model.gradient_checkpointing:
        enable_checkpointing(model)
    before = _eval_before(cfg, start_dir, model, tokenizer, source, log)
    ref = copy.deepcopy(model).eval() if cfg.grpo.beta > 0 else None
    hook = LogStepHook(cfg, run)
    sampler = Sampler(cfg, model, tokenizer, source, source.reward,
                      format_prompt=lambda text: source.format_prompt(text, tokenizer, cfg.model.chat_template))
    module = OISDModule(cfg, model, tokenizer, sampler, ref_model=ref, on_log_step=hook)
    if cfg.log.plan:  # the memory plan, and the measured peaks of the first steps beside it
        # imported only when asked for: the planner loads the tracing and measuring code
        from .plan.run_hook import plan_run

        plan_run(cfg, run, module, log)
    resume_step = checkpoint_step(resume) if resume else 0
    for path in run.step_logs:  # a resumed run writes the steps after its checkpoint again
        truncate_jsonl(path, resume_step)
    loggers = [lg for lg in (TableLogger(run.metrics, resume_step=resume_step),
                             make_wandb_logger(cfg, run.root, run_id, log=log, table=run.metrics)) if lg is not None]
    trainer = make_trainer(cfg, run, loggers)
    loader = DataLoader(list(range(cfg.max_steps)), batch_size=None, shuffle=False)
    started = time.time()
    try:
        trainer.fit(module, train_dataloaders=loader, ckpt_path=str(resume) if resume else None)
    except BaseException as err:
        stopped = "interrupted" if isinstance(err, (KeyboardInterrupt, SystemExit)) else "failed"
        run.write_status(status=stopped, error=f"{type(err).__name__}: {err}"[:500], failed=time.time())
        raise
    train_seconds = time.time() - started
    model = unsharded_policy(trainer, model, start_dir, cfg)
    if trainer.global_rank != 0:
        return run.root
    if lora.is_lora(model):
        lora.save(model, run.final_model)
    else:
        model.save_pretrained(run.final_model)
    tokenizer.save_pretrained(run.final_model)
    after = evaluation.summary(evaluation.held_out(cfg, model, tokenizer, source))
    result = {"before": before, "after": after, "train_seconds": train_seconds,
              "steps": cfg.max_steps, "method": cfg.method.name, "task": cfg.task.name, "seed": cfg.seed}
    run.eval.write_text(json.dumps(result, indent=2))
    close_loggers(loggers, before, after)
    run.write_status(status="finished", finished=time.time(), error=None)
    return run.root


def _open(run: RunDir, cfg: TrainConfig) -> str:
    """Write the run's config, environment and `running` status; returns its run id (a resumed
    run keeps its id and start time)."""
    status = run.read_status()
    run_id = status.get("run_id") or uuid.uuid4().hex[:8]
    run.config.write_text(to_yaml(cfg))
    run.env.write_text(json.dumps(environment_info(), indent=2))
    run.write_status(status="running", run_id=run_id, started=status.get("started", time.time()))
    return run_id


def _eval_before(cfg: TrainConfig, start_dir: Path, model, tokenizer, source, log) -> dict:
    """Held-out accuracy of the starting policy; empty on ranks started by a DDP launcher (rank 0
    evaluates)."""
    if launched_rank() != 0:
        return {}
    before = evaluation.before_training(cfg, cache_root(cfg), start_dir, model, tokenizer, source)
    log(f"held-out before RL: greedy {before['greedy_acc']:.3f}, avg@{before['k']} {before['avg_at_k']:.3f}")
    return before


__all__ = ["train"]
