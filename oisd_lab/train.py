"""One training run: run directory, loggers (W&B + local table), Trainer, resume, evaluation.

`RunDir` is the one place that decides where a run writes; everything else receives paths from it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from .checkpointing import AtomicCheckpointIO, find_resumable, truncate_jsonl
from .config import ConfigError, TrainConfig, check_start_model, to_dict, to_yaml
from .errors import first_line
from .evaluate import evaluate
from .models import is_tiny, load_pretrained
from .module import OISDModule
from .preflight import preflight
from .pretrain import cache_root, warm_start
from .run_hooks import LogStepHook
from .sources import load_source
from .tracking import TableLogger, environment_info, make_wandb_logger


@dataclass
class RunDir:
    """Every path a run writes."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def env(self) -> Path:
        return self.root / "env.json"

    @property
    def status(self) -> Path:
        return self.root / "status.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def completions(self) -> Path:
        return self.root / "completions.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def final_model(self) -> Path:
        return self.root / "final_model"

    @property
    def eval(self) -> Path:
        return self.root / "eval.json"

    @property
    def snapshots(self) -> Path:
        return self.root / "snapshots"

    def read_status(self) -> dict:
        try:
            return json.loads(self.status.read_text())
        except (OSError, ValueError):
            return {}

    def write_status(self, **fields) -> None:
        data = {**self.read_status(), **fields, "updated": time.time()}
        tmp = self.status.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, self.status)

    def last_checkpoint(self) -> Path | None:
        """The newest sound checkpoint (damaged ones are skipped with a warning naming them)."""
        found = find_resumable(self.checkpoints)
        return found.path if found else None

    def truncate_logs(self, last_step: int) -> None:
        """Per-step logs forget the steps after `last_step`: a resumed run writes them again."""
        for path in (self.completions, self.root / "diagnostics.jsonl"):
            truncate_jsonl(path, last_step)


def default_run_dir(cfg: TrainConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.task.name}-{cfg.method.name}-s{cfg.seed}-{stamp}"


def _cached_eval(cache: Path, key: dict, compute) -> dict:
    """Evaluation of an unchanged starting checkpoint is shared by every run that starts from it."""
    digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = cache / "eval" / f"{digest}.json"
    if path.is_file():
        return json.loads(path.read_text())
    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, path)
    return result


def run_eval(cfg: TrainConfig, model, tokenizer, source) -> dict:
    test = source.test_problems(cfg.task.num_test)
    prompts = [source.format_prompt(p.prompt, tokenizer, cfg.model.chat_template) for p in test]
    return evaluate(model, tokenizer, prompts, [p.answer for p in test], source.reward,
                    k=cfg.eval.k, temperature=cfg.eval.temperature,
                    max_new_tokens=cfg.eval.max_new_tokens or cfg.grpo.max_completion_length,
                    batch_size=cfg.eval.batch_size, seed=0)


def _summary(result: dict) -> dict:
    return {k: v for k, v in result.items() if not k.startswith("per_problem")}


_QUIET = (
    r".*ModelCheckpoint with manual optimization.*",
    r".*LeafSpec.*",
    r".*module\(s\) in eval mode.*",
    r".*anonymous setting has no effect.*",
    r".*does not have many workers.*",
    r".*resuming from a checkpoint that ended before the epoch ended.*",  # prompts are a function of the step
    r".*Checkpoint directory .* exists and is not empty.*",  # a resumed run writes into its own folder
)


def _drop_advert(record: logging.LogRecord) -> bool:
    return "litlogger" not in str(record.msg)


def _quiet() -> None:
    """Silence known-harmless notices and per-file progress bars that would bury the progress display."""
    from transformers.utils import logging as hf_logging

    for pattern in _QUIET:
        warnings.filterwarnings("ignore", message=pattern)
    hf_logging.disable_progress_bar()  # "Loading weights" / "Writing model shards" for a 6 MB model
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if _drop_advert not in rank_zero.filters:
        rank_zero.addFilter(_drop_advert)


def _load_start(cfg: TrainConfig, start_dir: Path):
    """The starting policy and tokenizer; a checkpoint that cannot be read is a one-line ConfigError."""
    try:
        return load_pretrained(start_dir, cfg.model.dtype, cfg.model.attn_implementation)
    except ConfigError:
        raise
    except Exception as err:  # safetensors, torch and json errors all mean the files are unreadable
        first = first_line(err)
        cause = err.__cause__ if isinstance(err, ValueError) and err.__cause__ else err
        line = first_line(cause)
        reason = f"{type(cause).__name__}: {line}" if line else type(cause).__name__
        if cfg.pretrain.init:
            raise ConfigError(f"pretrain.init: cannot load the checkpoint in {start_dir} ({reason}); save it "
                              "again with save_pretrained or point pretrain.init at another one") from err
        if isinstance(err, ValueError) and first.startswith("model."):
            raise ConfigError(first) from err  # load_pretrained's own message names the field
        if is_tiny(cfg.model.name):
            raise ConfigError(f"pretrain.cache_dir: the cached warm start {start_dir} cannot be loaded "
                              f"({reason}); delete that folder and it is rebuilt") from err
        raise ConfigError(f"model.name: cannot load {cfg.model.name} ({reason})") from err


def train(cfg: TrainConfig, log=print) -> Path:
    """Run (or resume) one training run; returns its run directory."""
    _quiet()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    run = RunDir(Path(cfg.run_dir) if cfg.run_dir else default_run_dir(cfg))
    cfg.run_dir = str(run.root)
    source = preflight(cfg)  # bad input (task, model, layers, run_dir) fails before anything is written
    check_start_model(cfg)
    start_dir = warm_start(cfg, log=log)
    L.seed_everything(cfg.seed, workers=False, verbose=False)
    model, tokenizer = _load_start(cfg, start_dir)  # a damaged checkpoint fails before the run dir exists
    run.root.mkdir(parents=True, exist_ok=True)
    resume = run.last_checkpoint()
    status = run.read_status()
    run_id = status.get("run_id") or uuid.uuid4().hex[:8]
    run.config.write_text(to_yaml(cfg))
    run.env.write_text(json.dumps(environment_info(), indent=2))
    run.write_status(status="running", run_id=run_id, started=status.get("started", time.time()))
    if cfg.model.gradient_checkpointing:
        enable_checkpointing(model)
    before = _eval_before(cfg, start_dir, model, tokenizer, source, log)
    ref = copy.deepcopy(model).eval() if cfg.grpo.beta > 0 else None
    hook = LogStepHook(cfg, run)
    module = OISDModule(cfg, model, tokenizer, source, source.reward,
                        format_prompt=lambda text: source.format_prompt(text, tokenizer, cfg.model.chat_template),
                        ref_model=ref, on_log_step=hook)
    resume_step = _checkpoint_step(resume) if resume else 0
    run.truncate_logs(resume_step)
    loggers = [TableLogger(run.metrics, resume_step=resume_step),
               make_wandb_logger(cfg, run.root, run_id, log=log, table=run.metrics)]
    trainer = _trainer(cfg, run, [lg for lg in loggers if lg is not None])
    loader = DataLoader(list(range(cfg.max_steps)), batch_size=None, shuffle=False)
    started = time.time()
    try:
        trainer.fit(module, train_dataloaders=loader, ckpt_path=str(resume) if resume else None)
    except BaseException as err:
        stopped = "interrupted" if isinstance(err, (KeyboardInterrupt, SystemExit)) else "failed"
        run.write_status(status=stopped, error=f"{type(err).__name__}: {err}"[:500], failed=time.time())
        raise
    train_seconds = time.time() - started
    model = _unsharded_policy(trainer, model, start_dir, cfg)
    if trainer.global_rank != 0:
        return run.root
    model.save_pretrained(run.final_model)
    tokenizer.save_pretrained(run.final_model)
    after = _summary(run_eval(cfg, model, tokenizer, source))
    result = {"before": before, "after": after, "train_seconds": train_seconds,
              "steps": cfg.max_steps, "method": cfg.method.name, "task": cfg.task.name, "seed": cfg.seed}
    run.eval.write_text(json.dumps(result, indent=2))
    _close_loggers([lg for lg in loggers if lg is not None], before, after)
    run.write_status(status="finished", finished=time.time(), error=None)
    return run.root


def _eval_before(cfg: TrainConfig, start_dir: Path, model, tokenizer, source, log) -> dict:
    """Held-out accuracy of the starting policy, cached by start checkpoint and eval settings;
    empty on ranks started by a DDP launcher (rank 0 evaluates)."""
    if _launched_rank() != 0:
        return {}
    key = {"start": str(start_dir.resolve()), "task": to_dict(cfg)["task"], "eval": to_dict(cfg)["eval"],
           "len": cfg.grpo.max_completion_length, "chat": cfg.model.chat_template}
    before = _cached_eval(cache_root(cfg), key, lambda: _summary(run_eval(cfg, model, tokenizer, source)))
    log(f"held-out before RL: greedy {before['greedy_acc']:.3f}, avg@{before['k']} {before['avg_at_k']:.3f}")
    return before


def _close_loggers(loggers: list, before: dict, after: dict) -> None:
    """Held-out results into the W&B run summary, then every logger closed."""
    for lg in loggers:
        if hasattr(lg, "experiment") and hasattr(lg.experiment, "summary"):
            for when, res in (("before", before), ("after", after)):
                for k, v in res.items():
                    if isinstance(v, (int, float)):
                        lg.experiment.summary[f"eval/{when}/{k}"] = v
        lg.finalize("success")
    _finish_wandb()


def evaluate_path(path: Path, overrides: list[str]) -> dict:
    """Evaluate a run directory (its final model, or its config's start) or a checkpoint directory."""
    from .config import compose, load_yaml

    run = RunDir(path)
    if run.config.is_file():
        cfg = load_yaml(run.config, overrides)
        model_dir = run.final_model if run.final_model.is_dir() else path
    else:
        cfg, model_dir = compose(overrides), path
    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"path: {path} holds neither a finished run nor a checkpoint (no config.json)")
    source = load_source(cfg.task)
    model, tokenizer = load_pretrained(model_dir, cfg.model.dtype, cfg.model.attn_implementation)
    result = run_eval(cfg, model, tokenizer, source)
    out = path / "eval_cli.json" if path.is_dir() else Path("eval_cli.json")
    out.write_text(json.dumps(_summary(result), indent=2))
    return result


def _unsharded_policy(trainer: L.Trainer, model, start_dir: Path, cfg: TrainConfig):
    """The trained policy with full parameters on rank 0. Under FSDP the parameters are shards
    after `fit`: every rank joins the gather, and rank 0 loads the full weights into a fresh copy."""
    from lightning.pytorch.strategies import FSDPStrategy

    if not isinstance(trainer.strategy, FSDPStrategy):
        return model
    state = trainer.strategy.lightning_module_state_dict()  # collective; full on rank 0 only
    if trainer.global_rank != 0:
        return model
    full, _ = load_pretrained(start_dir, cfg.model.dtype, cfg.model.attn_implementation)
    full.load_state_dict({k.removeprefix("policy."): v for k, v in state.items() if k.startswith("policy.")})
    return full.to(trainer.strategy.root_device)


def enable_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing, which the attention capture needs (see attention.py)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _launched_rank() -> int:
    """This process's global rank when a distributed launcher started it (0 otherwise)."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0)))


def _finish_wandb() -> None:
    """Close this run's W&B run, so that a later `train()` in the same process starts its own."""
    import sys

    if "wandb" in sys.modules and sys.modules["wandb"].run is not None:
        sys.modules["wandb"].finish()


def _checkpoint_step(path: Path) -> int:
    ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    return int(ckpt.get("global_step", 0))


def _step_bar(label: str):
    """Progress bar that names the method instead of Lightning's "Epoch 0/-2" (training is step-bounded)."""
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

    try:
        import rich  # noqa: F401
    except ImportError:
        return TQDMProgressBar()

    class StepBar(RichProgressBar):
        def _get_train_description(self, current_epoch: int) -> str:
            return label

    return StepBar()


def _trainer(cfg: TrainConfig, run: RunDir, loggers: list) -> L.Trainer:
    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpt = ModelCheckpoint(dirpath=run.checkpoints, filename="step={step}", every_n_train_steps=cfg.checkpoint_every,
                           save_last=True, save_top_k=2, monitor="step", mode="max", auto_insert_metric_name=False,
                           enable_version_counter=False)  # a resumed run overwrites, never writes step=N-v1
    callbacks: list = [ckpt]
    if cfg.log.progress_bar:
        callbacks.append(_step_bar(cfg.method.name))
    return L.Trainer(
        max_steps=cfg.max_steps, accelerator=cfg.accelerator, devices=cfg.devices, strategy=cfg.strategy,
        precision=cfg.precision, logger=loggers, callbacks=callbacks, log_every_n_steps=1,
        enable_progress_bar=cfg.log.progress_bar, enable_model_summary=False, num_sanity_val_steps=0,
        default_root_dir=run.root, use_distributed_sampler=False, max_epochs=-1, plugins=[AtomicCheckpointIO()],
    )


__all__ = ["train", "RunDir", "ConfigError"]
