"""Side by side: rollouts through `model.generate` (the previous implementation) and through
`oisd_lab.rollout.generate` (prefill once per prompt, shared KV cache, finished rows dropped).

Same prompts, same model, interleaved rounds; prints and writes wall and CPU seconds per call and
completion tokens per second.

    python benchmarks/compare_generate.py --out benchmarks/results/generate.json [--init DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from transformers import GenerationConfig

from oisd_lab.models import build_char_tokenizer, build_tiny_model, load_pretrained
from oisd_lab.rollout import completion_mask_from_ids, generate
from oisd_lab.tasks import get_task


def hf_generate(model, tokenizer, prompts, num_generations, max_new_tokens):
    """The previous rollout path: every row prefilled, transformers' sampling loop."""
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    ids = enc["input_ids"].repeat_interleave(num_generations, dim=0)
    mask = enc["attention_mask"].repeat_interleave(num_generations, dim=0)
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                           pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                           use_cache=True)
    model.eval()
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)
    model.train()
    return completion_mask_from_ids(out[:, ids.shape[1]:], tokenizer.eos_token_id).sum()


def ours(model, tokenizer, prompts, num_generations, max_new_tokens):
    return generate(model, tokenizer, prompts, num_generations, max_new_tokens).completion_mask.sum()


def timed(fn, *args):
    w, c = time.perf_counter(), time.process_time()
    tokens = float(fn(*args))
    return {"wall": time.perf_counter() - w, "cpu": time.process_time() - c, "tokens": tokens}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--init", default=None, help="checkpoint directory (default: random tiny model)")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--max-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.init:
        model, tok = load_pretrained(args.init)
    else:
        tok = build_char_tokenizer()
        model = build_tiny_model("tiny", len(tok), seed=0)
    task = get_task("arith")
    load = os.getloadavg()
    runs = {"model.generate (before)": [], "oisd_lab.rollout.generate (after)": []}
    fns = {"model.generate (before)": hf_generate, "oisd_lab.rollout.generate (after)": ours}
    for r in range(args.repeats + 1):
        prompts = [p.prompt for p in task.train_batch(r, args.prompts, 0)]
        order = list(fns) if r % 2 == 0 else list(fns)[::-1]
        for name in order:
            torch.manual_seed(r)
            res = timed(fns[name], model, tok, prompts, args.generations, args.max_len)
            if r > 0:  # round 0 is a warm-up
                runs[name].append(res)
    result = {"init": args.init or "random", "prompts": args.prompts, "generations": args.generations,
              "max_len": args.max_len, "threads": args.threads, "load_avg": {"start": load, "end": os.getloadavg()},
              "per_impl": {}}
    for name, rs in runs.items():
        result["per_impl"][name] = {
            "wall_s": statistics.median(x["wall"] for x in rs), "cpu_s": statistics.median(x["cpu"] for x in rs),
            "wall_range": [min(x["wall"] for x in rs), max(x["wall"] for x in rs)],
            "cpu_range": [min(x["cpu"] for x in rs), max(x["cpu"] for x in rs)],
            "tokens": statistics.median(x["tokens"] for x in rs),
            "tokens_per_s_wall": statistics.median(x["tokens"] / x["wall"] for x in rs),
        }
    ratios = [a["cpu"] / b["cpu"] for a, b in zip(runs["oisd_lab.rollout.generate (after)"],
                                                  runs["model.generate (before)"], strict=True)]
    result["cpu_ratio_after_vs_before"] = {"median": statistics.median(ratios), "min": min(ratios),
                                           "max": max(ratios)}
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
