"""Warm start: supervised fine-tuning of a tiny model on worked solutions, cached by its settings.

RL needs a policy that is sometimes right: a random tiny model never is. `warm_start` trains one
to partial held-out accuracy and caches it under a key derived from every setting that shapes it,
so later runs (and parallel grid workers) reuse the same base checkpoint.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch

from .config import TrainConfig
from .errors import ConfigError
from .models import build_char_tokenizer, build_tiny_model, is_tiny
from .tasks import get_task

CACHE_VERSION = 1


def cache_root(cfg: TrainConfig) -> Path:
    if cfg.pretrain.cache_dir:
        return Path(cfg.pretrain.cache_dir)
    env = os.environ.get("OISD_LAB_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "oisd_lab"


def warm_start_key(cfg: TrainConfig) -> str:
    p = cfg.pretrain
    spec = dict(
        v=CACHE_VERSION, model=cfg.model.name, task=cfg.task.name, difficulty=cfg.task.difficulty,
        steps=p.steps, batch=p.batch_size, lr=p.lr, seed=p.seed,
    )
    digest = hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
    return f"{cfg.model.name}-{cfg.task.name}-{p.steps}steps-{digest}"


@contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def warm_start(cfg: TrainConfig, log: Callable[[str], None] = print) -> Path:
    """Directory of the starting checkpoint: `pretrain.init`, or the cached warm start (built once)."""
    if cfg.pretrain.init:
        path = Path(cfg.pretrain.init)
        if not (path / "config.json").is_file():
            raise ConfigError(f"pretrain.init: {path} is not a checkpoint directory (no config.json)")
        return path
    if not is_tiny(cfg.model.name):
        return Path(cfg.model.name)  # pretrained checkpoints start RL as they are
    target = cache_root(cfg) / "base" / warm_start_key(cfg)
    with _file_lock(target.with_suffix(".lock")):
        if (target / "config.json").is_file():
            return target
        log(f"warm start: supervised {cfg.pretrain.steps} steps on '{cfg.task.name}' -> {target}")
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        pretrain(cfg, tmp)
        os.replace(tmp, target)  # atomic: a half-written warm start is never visible
    return target


def _batch(tokenizer, problems, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids, attention mask and labels (-100 on prompt and padding) for prompt+solution+EOS."""
    prompts = [p.prompt for p in problems]
    full = [p.prompt + p.solution + tokenizer.eos_token for p in problems]
    enc = tokenizer(full, return_tensors="pt", padding=True, add_special_tokens=False)
    prompt_lens = [len(tokenizer(x, add_special_tokens=False)["input_ids"]) for x in prompts]
    ids, mask = enc["input_ids"], enc["attention_mask"]
    labels = ids.clone()
    pad_count = (mask == 0).sum(1)
    positions = torch.arange(ids.shape[1]).unsqueeze(0)
    is_prompt = positions < (pad_count + torch.tensor(prompt_lens)).unsqueeze(1)
    labels[is_prompt | (mask == 0)] = -100
    return ids.to(device), mask.to(device), labels.to(device)


def pretrain(cfg: TrainConfig, out_dir: Path, log: Callable[[str], None] = print) -> dict:
    """Train a tiny model on worked solutions and save it (model + tokenizer) to `out_dir`."""
    p = cfg.pretrain
    task = get_task(cfg.task.name, **cfg.task.difficulty)
    tokenizer = build_char_tokenizer()
    model = build_tiny_model(cfg.model.name, vocab_size=len(tokenizer), seed=p.seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=p.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * max(0.1, 1 - s / max(p.steps, 1)))
    start, losses = time.time(), []
    for step in range(p.steps):
        ids, mask, labels = _batch(tokenizer, task.train_batch(step, p.batch_size, p.seed + 7919), "cpu")
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if (step + 1) % 100 == 0:
            log(f"  warm start step {step + 1}/{p.steps}: loss {sum(losses[-100:]) / len(losses[-100:]):.3f}")
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    info = {"steps": p.steps, "final_loss": losses[-1] if losses else None, "seconds": time.time() - start}
    (out_dir / "warm_start.json").write_text(json.dumps(info, indent=2))
    return info
