"""`trl` section: the same GRPO work through TRL's `GRPOTrainer` and through `oisd-lab`."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

from .common import (
    Settings,
    bench_config,
    bench_module,
    clock_now,
    fit_steps,
    median_of,
    median_ratio,
    per_round,
    start_policy,
    stats,
    timed_call,
)


def bench_trl(s: Settings) -> dict:
    try:
        import trl  # noqa: F401
    except ImportError:
        return {"skipped": "trl is not installed (pip install -e '.[bench]')"}
    # on use: a section loads training code only when it runs, so importing the bench package stays light
    from ..sources import load_source

    policy, tok = start_policy(s)
    cfg = bench_config(s, "grpo")
    source = load_source(cfg.task)
    ours, theirs = [], []
    with tempfile.TemporaryDirectory(prefix="oisd_bench_trl_") as tmp:
        model_dir = Path(tmp) / "model"  # both trainers start from these weights every round
        policy.save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
        for r in range(s.repeats):
            order = [ours_fit, trl_fit] if r % 2 == 0 else [trl_fit, ours_fit]
            for fn in order:
                rows = fn(s, cfg, source, model_dir, r)
                (ours if fn is ours_fit else theirs).append(rows[1:])
    out = {"batch": {"prompts": s.prompts, "generations": s.generations, "max_completion_length": s.max_len,
                     "micro_batch_size": s.micro, "loss_type": "dapo", "beta": 0.0},
           "ours_mean_completion_length": stats([median_of(x, "completions/mean_length") for x in ours]),
           "trl_mean_completion_length": stats([median_of(x, "completions/mean_length") for x in theirs])}
    for c in ("cpu", "wall"):
        out[c] = {"ours_step_s": stats([median_of(x, c) for x in ours]),
                  "trl_step_s": stats([median_of(x, c) for x in theirs]),
                  "ratio_ours_vs_trl": per_round(ours, theirs, median_ratio(c)),
                  "ours_rollout_s": stats([median_of(x, f"rollout_{c}") for x in ours]),
                  "trl_generate_s": stats([median_of(x, f"generate_{c}") for x in theirs])}
    return out


def ours_fit(s: Settings, cfg, source, model_dir: Path, r: int, fmt=None) -> list[dict]:
    """`fmt`: prompt text -> what the model sees (e.g. the chat template), as for TRL."""
    # on use: a section loads training code only when it runs, so importing the bench package stays light
    from ..models import load_pretrained

    policy, tok = load_pretrained(model_dir)
    cfg = copy.deepcopy(cfg)
    cfg.seed = s.seed + r
    return fit_steps(bench_module(cfg, policy, tok, source, format_prompt=fmt), s.trl_steps + 1)


def trl_fit(s: Settings, cfg, source, model_dir: Path, r: int, fmt=None) -> list[dict]:
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    # on use: a section loads training code only when it runs, so importing the bench package stays light
    from ..models import load_pretrained

    steps = s.trl_steps + 1
    problems = [p for k in range(steps) for p in source.train_batch(k, s.prompts, s.seed + r)]
    fmt = fmt or (lambda text: text)
    data = Dataset.from_dict({"prompt": [fmt(p.prompt) for p in problems], "answer": [p.answer for p in problems]})

    def correct(prompts, completions, answer, **kwargs):
        return [source.reward(c, a) for c, a in zip(completions, answer, strict=True)]

    rows: list[dict] = []
    marks: list[tuple[float, float]] = []

    class Rec(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if not marks:
                marks.append(clock_now())

        def on_step_end(self, args, state, control, **kwargs):
            marks.append(clock_now())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs:
                rows.append({"completions/mean_length": float(logs["completions/mean_length"])})

    batch = s.prompts * s.generations
    accum = max(batch // s.micro, 1)
    args = GRPOConfig(
        output_dir=str(model_dir.parent / f"trl-{r}"), num_generations=s.generations,
        max_completion_length=s.max_len, per_device_train_batch_size=min(s.micro, batch),
        gradient_accumulation_steps=accum, loss_type="dapo", beta=0.0, learning_rate=cfg.grpo.lr,
        max_grad_norm=cfg.grpo.max_grad_norm, temperature=cfg.grpo.temperature, top_p=cfg.grpo.top_p,
        top_k=0, epsilon=cfg.grpo.epsilon_low, epsilon_high=cfg.grpo.epsilon_high,
        scale_rewards="group", report_to="none", use_cpu=True, bf16=False, fp16=False,
        gradient_checkpointing=False, use_vllm=False, max_steps=steps, logging_steps=1,
        save_strategy="no", shuffle_dataset=False, disable_tqdm=True, seed=s.seed + r,
        dataloader_num_workers=0, lr_scheduler_type="constant", weight_decay=cfg.grpo.weight_decay)
    policy, tok = load_pretrained(model_dir)
    gen_times: list[tuple[float, float]] = []
    policy.generate = timed_call(policy.generate, gen_times)
    trainer = GRPOTrainer(model=policy, reward_funcs=correct, args=args, train_dataset=data,
                          processing_class=tok, callbacks=[Rec()])
    trainer.remove_callback(PrinterCallback)  # no per-step log lines in the bench output
    trainer.train()
    out = []
    for (w0, c0), (w1, c1), row, (gw, gc) in zip(marks, marks[1:], rows, gen_times, strict=False):
        out.append({**row, "wall": w1 - w0, "cpu": c1 - c0, "generate_wall": gw, "generate_cpu": gc})
    return out
