"""Pieces the benchmark sections share: settings, configs and policies, the step clock, Lightning
fits and statistics over rounds."""

from __future__ import annotations

import os
import platform
import statistics
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

PRESETS = ("grpo", "oisd_logit", "oisd_attn", "oisd", "oisd_unsigned")


SECTIONS = ("presets", "memory", "attn512", "trl", "smollm2")


@dataclass
class Settings:
    """Sizes of every section; `--quick` shrinks them to a smoke test."""

    prompts: int = 16
    generations: int = 8
    max_len: int = 32
    micro: int = 64
    repeats: int = 5
    steps: int = 3
    threads: int = 1
    seed: int = 0
    init: str = "random"
    mem_vocab: int = 151_936
    mem_tokens: int = 4096
    mem_completion: int = 256
    attn_len: int = 512
    attn_prompts: int = 4
    attn_micro: int = 32
    trl_steps: int = 4
    smol_model: str = "smollm2"
    smol_prompts: int = 4
    smol_generations: int = 4
    smol_len: int = 64
    smol_rounds: int = 2
    smol_trl_steps: int = 1
    smol_mem_rows: int = 4
    smol_mem_len: int = 256
    presets: tuple[str, ...] = PRESETS
    sections: tuple[str, ...] = SECTIONS


QUICK = dict(prompts=2, generations=2, max_len=6, micro=4, repeats=1, steps=1, mem_vocab=2048,
             mem_tokens=64, mem_completion=16, attn_len=24, attn_prompts=1, attn_micro=2, trl_steps=1,
             smol_prompts=1, smol_generations=2, smol_len=4, smol_rounds=1, smol_mem_rows=2, smol_mem_len=8)


def stats(values: list[float]) -> dict:
    """Median and spread of repeated measurements."""
    vals = [float(v) for v in values]
    if not vals:
        return {"median": None, "min": None, "max": None, "n": 0, "values": []}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals),
            "values": vals}


def machine_info(s: Settings, quick: bool = False) -> dict:
    import lightning
    import transformers

    cpu = "unknown"
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        trl_version = None
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "nproc": os.cpu_count(), "cpu": cpu,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "lightning": lightning.__version__, "trl": trl_version, "quick": quick,
            "load_avg": os.getloadavg(), "settings": asdict(s)}


def quiet_logs() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("WANDB_MODE", "disabled")
    warnings.filterwarnings("ignore")
    import logging

    from transformers.utils import logging as hf_logging

    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero",
                 "lightning.fabric.utilities.rank_zero", "transformers", "trl"):
        logging.getLogger(name).setLevel(logging.ERROR)
    hf_logging.disable_progress_bar()


def bench_config(s: Settings, method: str, **extra):
    # on use: a section loads training code only when it runs, so importing the bench package stays light
    from ..config import compose

    over = [f"method={method}", f"seed={s.seed}", "max_steps=1000000", "log.progress_bar=false",
            f"grpo.prompts_per_step={extra.pop('prompts', s.prompts)}",
            f"grpo.num_generations={s.generations}",
            f"grpo.max_completion_length={extra.pop('max_len', s.max_len)}",
            f"grpo.micro_batch_size={extra.pop('micro', s.micro)}"]
    return compose(over + [f"{k}={v}" for k, v in extra.items()])


def start_policy(s: Settings):
    """(policy, tokenizer) of the presets and TRL sections: `--init` random, warm or a checkpoint."""
    # on use: a section loads training code only when it runs, so importing the bench package stays light
    from ..models import build_char_tokenizer, load_pretrained

    if s.init == "random":
        tok = build_char_tokenizer()
        return tiny_policy(len(tok), s.seed), tok
    path = s.init
    if s.init == "warm":
        # on use: a section loads training code only when it runs, so importing the bench package stays light
        from ..pretrain import warm_start

        path = warm_start(bench_config(s, "grpo"), log=lambda *a: None)
    return load_pretrained(path)


def tiny_policy(vocab_size: int, seed: int = 0, max_positions: int = 512):
    # on use: a section loads training code only when it runs, so importing the bench package stays light
    from ..models import build_tiny_model

    return build_tiny_model("tiny", vocab_size=vocab_size, seed=seed, max_positions=max_positions)


def clock_now() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


class _Clock:
    """Lightning callback and logger in one: per step, wall and process CPU seconds, and the
    module's own metric row (which holds its stage timers)."""

    def __init__(self) -> None:
        from lightning.pytorch.callbacks import Callback
        from lightning.pytorch.loggers import Logger

        clock = self
        self.marks: list[tuple[float, float]] = []
        self.rows: list[dict] = []

        class _Cb(Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                if not clock.marks:
                    clock.marks.append(clock_now())

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                clock.marks.append(clock_now())

        class _Log(Logger):
            name, version = "bench", "0"

            def log_hyperparams(self, params, *a, **k):
                return None

            def log_metrics(self, metrics, step=None):
                clock.rows.append(dict(metrics))

        self.callback, self.logger = _Cb(), _Log()

    def steps(self) -> list[dict]:
        out = []
        for (w0, c0), (w1, c1), row in zip(self.marks, self.marks[1:], self.rows, strict=False):
            out.append({**row, **_phases(row), "wall": w1 - w0, "cpu": c1 - c0})
        return out


PHASES = {"rollout": "time/rollout", "optimise": "time/forward_backward", "diagnostics": "time/diagnostics"}
"""Bench phase names -> the module's own stage timers (wall seconds; `<timer>_cpu` for CPU seconds)."""


def _phases(row: dict) -> dict:
    """`<phase>_wall` / `<phase>_cpu` of one step from the module's logged stage timers."""
    out = {}
    for phase, key in PHASES.items():
        if key in row:
            out[f"{phase}_wall"], out[f"{phase}_cpu"] = row[key], row[f"{key}_cpu"]
    return out


def fit_steps(module, steps: int) -> list[dict]:
    """`steps` Lightning training steps; per step the module's metrics, `wall` and `cpu` seconds
    (from the start of one step to the end of the next, so Lightning and logging count), and
    `rollout_*`, `optimise_*`, `diagnostics_*` phase times."""
    import lightning as L
    from torch.utils.data import DataLoader

    clock = _Clock()
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=[clock.logger],
                        callbacks=[clock.callback], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=1,
                        max_epochs=-1, default_root_dir=tempfile.gettempdir())
    trainer.fit(module, train_dataloaders=DataLoader(list(range(steps)), batch_size=None))
    return clock.steps()


def bench_module(cfg, policy, tokenizer, source, fixed=None, hook=None, format_prompt=None):
    # on use: a section loads training code only when it runs, so importing the bench package stays light
    from ..module import OISDModule
    from ..sampler import Sampler

    # With `fixed`, one rollout batch for every step: the optimisation step alone.
    draw = (lambda step, rank, world: fixed) if fixed is not None else None
    sampler = Sampler(cfg, policy, tokenizer, source, source.reward, format_prompt=format_prompt, draw=draw)
    return OISDModule(cfg, policy, tokenizer, sampler, on_log_step=hook)


def rotated(items: tuple[str, ...], r: int) -> list[str]:
    k = r % len(items)
    return list(items[k:] + items[:k])


def median_of(rows: list[dict], key: str) -> float:
    return statistics.median(float(r[key]) for r in rows)


def per_round(fits_a: list, fits_b: list, fn) -> dict:
    return stats([fn(a, b) for a, b in zip(fits_a, fits_b, strict=True)])


def median_ratio(key: str):
    return lambda a, b: median_of(a, key) / median_of(b, key)


class NoEos:
    """A tokenizer view whose EOS id is never sampled, so every completion runs to full length."""

    def __init__(self, tokenizer) -> None:
        self._tok = tokenizer
        self.eos_token_id = len(tokenizer) + 1_000_000

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def __call__(self, *args, **kwargs):
        return self._tok(*args, **kwargs)


def timed_call(fn, sink: list[tuple[float, float]]):
    def wrapper(*args, **kwargs):
        w0, c0 = clock_now()
        try:
            return fn(*args, **kwargs)
        finally:
            w1, c1 = clock_now()
            sink.append((w1 - w0, c1 - c0))

    return wrapper
