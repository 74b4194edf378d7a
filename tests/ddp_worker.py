"""A few GRPO/OISD steps under a Lightning strategy on CPU, dumping what each rank saw and ended with.

    python tests/ddp_worker.py OUT_DIR [key=value ...]     (e.g. strategy=ddp devices=2 accelerator=cpu)

Each rank writes OUT_DIR/rank<r>.pt: its final parameters, its starting parameters, for every
step the prompts it rolled out, their rewards and advantages, and the metric rows it logged. With
STRATEGIES="ddp fsdp" one launch of the ranks fits under each strategy in turn and writes
OUT_DIR/<strategy>/rank<r>.pt; with RESUME_FROM="fsdp/step=2.ckpt" that run is then fitted again
from that checkpoint into OUT_DIR/fsdp/resumed. With GLOBAL_SEEDED=1 every rank rolls out the whole step's prompts under
one seed per batch and keeps its own rows, so that the rollouts do not depend on the number of
ranks (a one-process run with `grpo.prompts_per_step` times the ranks sees the same ones). Used by tests/test_ddp.py, tests/test_fsdp.py and
tests/test_one_process.py.
The model is a seeded random tiny decoder; the reward is dense (fraction of digit characters) so
that every group has non-zero advantages and the gradients are worth synchronising; everything
else (task source, prompt slicing per rank, rollout, scoring, advantages, losses, optimizer,
Lightning strategy) is the training path of `oisd-lab train`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from lightning.pytorch.loggers import Logger


def digit_fraction(text: str, answer: str) -> float:
    return sum(c.isdigit() for c in text) / max(len(text), 1)


class Recorder(Logger):
    """A Lightning logger that keeps every row the module logs (the `grad/*` figures among them)."""

    name, version = "record", 0

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict] = []

    def log_metrics(self, metrics, step=None) -> None:
        self.rows.append({"step": step, **metrics})

    def log_hyperparams(self, *args, **kwargs) -> None:
        pass


def main() -> None:
    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    strategies = os.environ.get("STRATEGIES", "").split()
    if not strategies:
        run(out, sys.argv[2:])
    for strategy in strategies:
        run(out / strategy, [*sys.argv[2:], f"strategy={strategy}"])
    if os.environ.get("RESUME_FROM"):  # <strategy>/<checkpoint name>: that run again from that checkpoint
        strategy, name = os.environ["RESUME_FROM"].split("/")
        run(out / strategy / "resumed", [*sys.argv[2:], f"strategy={strategy}"],
            ckpt_path=out / strategy / "run" / "checkpoints" / name)


def run(out: Path, overrides: list[str], ckpt_path: Path | None = None) -> None:
    from oisd_lab.config import compose
    from oisd_lab.models import build_char_tokenizer, build_tiny_model
    from oisd_lab.module import OISDModule
    from oisd_lab.run.folder import RunDir
    from oisd_lab.run.trainer import make_trainer
    from oisd_lab.sampler import Sampler
    from oisd_lab.sources import load_source

    out.mkdir(parents=True, exist_ok=True)
    cfg = compose([f"run_dir={out / 'run'}", "log.progress_bar=false", "checkpoint_every=1000",
                   "log.wandb_mode=disabled", *overrides])
    source = load_source(cfg.task)
    tokenizer = build_char_tokenizer()
    model = build_tiny_model("tiny", vocab_size=len(tokenizer), seed=0)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    records: list[dict] = []

    def record(view, step, problems, rollout) -> dict:
        records.append({"step": step, "prompts": [p.prompt for p in problems],
                        "rewards": rollout.rewards.clone(), "advantages": rollout.advantages.clone()})
        return {}

    fmt = lambda text: source.format_prompt(text, tokenizer, False)  # noqa: E731
    sampler = None
    if os.environ.get("GLOBAL_SEEDED") == "1":  # every rank rolls out the whole global batch seeded per batch
        from oisd_lab.rollout import generate  # and keeps its rows: equal for any number of ranks
        from oisd_lab.sharding import gathered

        def sampler(batch: int, rank: int, world: int):
            g = cfg.grpo
            allp = source.train_batch(batch + 1, g.prompts_per_step * world, cfg.seed)
            torch.manual_seed(1000 * batch)
            with gathered(module.policy):
                whole = generate(module.policy, tokenizer, [fmt(p.prompt) for p in allp], g.num_generations,
                                 g.max_completion_length, g.temperature, g.top_p)
            rows = slice(rank * g.prompts_per_step * g.num_generations,
                         (rank + 1) * g.prompts_per_step * g.num_generations)
            return allp[rank * g.prompts_per_step:(rank + 1) * g.prompts_per_step], whole.select(rows)
    elif os.environ.get("RANK_SEEDED") == "1":  # rollouts seeded per (batch, rank): equal under ddp and fsdp
        from oisd_lab.rollout import generate
        from oisd_lab.sharding import gathered

        def sampler(batch: int, rank: int, world: int):
            g = cfg.grpo
            allp = source.train_batch(batch + 1, g.prompts_per_step * world, cfg.seed)
            mine = allp[rank * g.prompts_per_step:(rank + 1) * g.prompts_per_step]
            torch.manual_seed(1000 * batch + rank)
            with gathered(module.policy):
                return mine, generate(module.policy, tokenizer, [fmt(p.prompt) for p in mine], g.num_generations,
                                      g.max_completion_length, g.temperature, g.top_p)

    module = OISDModule(cfg, model, tokenizer, Sampler(cfg, model, tokenizer, source, digit_fraction,
                                                       format_prompt=fmt, draw=sampler), on_log_step=record)
    logger = Recorder()
    trainer = make_trainer(cfg, RunDir(Path(cfg.run_dir)), [logger])
    loader = torch.utils.data.DataLoader(list(range(cfg.max_steps)), batch_size=None, shuffle=False)
    trainer.fit(module, train_dataloaders=loader, ckpt_path=ckpt_path)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    params = {k: v.detach().cpu().clone() for k, v in get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)).items()}
    torch.save({"rank": trainer.global_rank, "world_size": trainer.world_size, "params": params,
                "start": start, "records": records, "metrics": logger.rows},
               out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
