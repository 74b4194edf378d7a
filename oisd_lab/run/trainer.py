"""The Lightning side of a run: Trainer assembly (checkpoints, progress bar, loggers), activation
checkpointing, ranks, and the trained policy gathered back from FSDP shards."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import torch

from ..config import TrainConfig
from ..models import load_pretrained
from ..sharding import ShardedStrategy, make_strategy
from .checkpointing import AtomicCheckpointIO
from .folder import RunDir


def make_trainer(cfg: TrainConfig, run: RunDir, loggers: list) -> L.Trainer:
    """A step-bounded Trainer that checkpoints into `run.checkpoints` every `checkpoint_every` steps."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpt = ModelCheckpoint(dirpath=run.checkpoints, filename="step={step}", every_n_train_steps=cfg.checkpoint_every,
                           save_last=True, save_top_k=2, monitor="step", mode="max", auto_insert_metric_name=False,
                           enable_version_counter=False)  # a resumed run overwrites, never writes step=N-v1
    callbacks: list = [ckpt]
    if cfg.log.progress_bar:
        callbacks.append(_step_bar(cfg.method.name))
    return L.Trainer(
        max_steps=cfg.max_steps, accelerator=cfg.accelerator, devices=cfg.devices, num_nodes=cfg.num_nodes,
        strategy=make_strategy(cfg.strategy),
        precision=cfg.precision, logger=loggers, callbacks=callbacks, log_every_n_steps=1,
        enable_progress_bar=cfg.log.progress_bar, enable_model_summary=False, num_sanity_val_steps=0,
        default_root_dir=run.root, use_distributed_sampler=False, max_epochs=-1, plugins=[AtomicCheckpointIO()],
    )


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


def enable_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing, which the attention capture needs (see attention.py)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def launched_rank() -> int:
    """This process's global rank when a launcher started it (0 otherwise), from the cluster
    environment Lightning picks: torchrun (RANK), SLURM under `srun` (SLURM_PROCID), LSF, MPI; or
    from RANK / LOCAL_RANK that Lightning sets on the ranks it starts itself."""
    from lightning.fabric.plugins.environments import (
        LSFEnvironment,
        MPIEnvironment,
        SLURMEnvironment,
        TorchElasticEnvironment,
    )

    if TorchElasticEnvironment.detect():
        return int(os.environ["RANK"])
    if SLURMEnvironment.detect():
        return int(os.environ["SLURM_PROCID"])
    for env in (LSFEnvironment, MPIEnvironment):
        if env.detect():
            return env().global_rank()
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0)))


def checkpoint_step(path: Path) -> int:
    """The optimiser step a Lightning checkpoint was saved at."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    return int(ckpt.get("global_step", 0))


def unsharded_policy(trainer: L.Trainer, model, start_dir: Path, cfg: TrainConfig):
    """The trained policy with full parameters on rank 0. Under FSDP the parameters are shards
    after `fit`: every rank joins the gather, and rank 0 loads the full weights into a fresh copy."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not isinstance(trainer.strategy, ShardedStrategy):
        return model
    # collective; full on rank 0 only
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if trainer.global_rank != 0:
        return model
    full, _ = load_pretrained(start_dir, cfg.model.dtype, cfg.model.attn_implementation)
    full.load_state_dict(state)
    return full.to(trainer.strategy.root_device)
