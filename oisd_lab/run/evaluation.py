"""Held-out evaluation: greedy accuracy and Avg@K (mean accuracy over K samples per problem).

Avg@K is what the paper reports; greedy accuracy is the low-noise companion. Sampling is seeded
independently of the training seed, so the same checkpoint always gets the same numbers. A run
evaluates its starting policy (cached: every run from the same start shares it) and its trained
policy; `oisd-lab eval` evaluates a run folder or a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..config import TrainConfig, compose, load_yaml, to_dict
from ..errors import ConfigError
from ..models import load_pretrained
from ..rollout import generate
from ..sources import load_source
from .folder import RunDir


def evaluate(
    model,
    tokenizer,
    prompts: Sequence[str],
    answers: Sequence[str],
    reward_fn: Callable[[str, str], float],
    k: int = 4,
    temperature: float = 1.0,
    max_new_tokens: int = 32,
    batch_size: int = 256,
    seed: int = 0,
) -> dict:
    """Greedy accuracy and Avg@K of `model` on (prompt, answer) pairs, plus per-problem detail."""
    start = time.time()
    greedy, sampled, lengths = [], [], []
    gen = torch.random.fork_rng(devices=[]) if not torch.cuda.is_available() else torch.random.fork_rng()
    with gen:
        torch.manual_seed(seed)
        for lo in range(0, len(prompts), batch_size):
            chunk_p, chunk_a = prompts[lo : lo + batch_size], answers[lo : lo + batch_size]
            g = generate(model, tokenizer, list(chunk_p), 1, max_new_tokens, do_sample=False)
            greedy += [reward_fn(t, a) for t, a in zip(g.texts, chunk_a, strict=True)]
            lengths += g.completion_mask.sum(1).tolist()
            per = max(1, batch_size // k)
            for lo2 in range(0, len(chunk_p), per):
                sp = list(chunk_p[lo2 : lo2 + per])
                s = generate(model, tokenizer, sp, k, max_new_tokens, temperature=temperature)
                for i, a in enumerate(chunk_a[lo2 : lo2 + per]):
                    sampled.append(sum(reward_fn(t, a) for t in s.texts[i * k : (i + 1) * k]) / k)
    n = len(prompts)
    return {
        "n": n,
        "k": k,
        "greedy_acc": sum(greedy) / max(n, 1),
        f"avg@{k}": sum(sampled) / max(n, 1),
        "avg_at_k": sum(sampled) / max(n, 1),
        "mean_greedy_length": sum(lengths) / max(n, 1),
        "seconds": time.time() - start,
        "per_problem_greedy": greedy,
        "per_problem_avg": sampled,
    }


def held_out(cfg: TrainConfig, model, tokenizer, source) -> dict:
    """`evaluate` on the task's held-out problems with the settings of `cfg.eval`."""
    test = source.test_problems(cfg.task.num_test)
    prompts = [source.format_prompt(p.prompt, tokenizer, cfg.model.chat_template) for p in test]
    return evaluate(model, tokenizer, prompts, [p.answer for p in test], source.reward,
                    k=cfg.eval.k, temperature=cfg.eval.temperature,
                    max_new_tokens=cfg.eval.max_new_tokens or cfg.grpo.max_completion_length,
                    batch_size=cfg.eval.batch_size, seed=0)


def summary(result: dict) -> dict:
    """An evaluation result without its per-problem lists."""
    return {k: v for k, v in result.items() if not k.startswith("per_problem")}


def cached(cache: Path, key: dict, compute: Callable[[], dict]) -> dict:
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


def before_training(cfg: TrainConfig, cache: Path, start_dir: Path, model, tokenizer, source) -> dict:
    """Held-out summary of the starting policy, cached by start checkpoint and eval settings."""
    key = {"start": str(start_dir.resolve()), "task": to_dict(cfg)["task"], "eval": to_dict(cfg)["eval"],
           "len": cfg.grpo.max_completion_length, "chat": cfg.model.chat_template}
    return cached(cache, key, lambda: summary(held_out(cfg, model, tokenizer, source)))


def evaluate_path(path: Path, overrides: list[str]) -> dict:
    """Evaluate a run directory (its final model, or its config's start) or a checkpoint directory;
    the summary is also written to `eval_cli.json` there."""
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
    result = held_out(cfg, model, tokenizer, source)
    out = run.eval_cli if path.is_dir() else Path("eval_cli.json")
    out.write_text(json.dumps(summary(result), indent=2))
    return result


def report(run_dir: Path, seconds: float) -> str:
    """The before/after table that `oisd-lab train` prints from a finished run's eval.json."""
    result = json.loads(RunDir(run_dir).eval.read_text())
    b, a = result["before"], result["after"]
    k = a["k"]
    return "\n".join([
        "",
        f"{result['method']} on {result['task']} (seed {result['seed']}), {result['steps']} steps, "
        f"{seconds:.0f} s wall ({result['train_seconds']:.0f} s RL)",
        f"held-out ({a['n']} problems)   before   after",
        f"  greedy accuracy          {b['greedy_acc']:.3f}    {a['greedy_acc']:.3f}",
        f"  avg@{k}                    {b['avg_at_k']:.3f}    {a['avg_at_k']:.3f}",
        "run directory:",
    ])
