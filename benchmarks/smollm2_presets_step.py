"""Every method preset's forward/backward against GRPO's on SmolLM2-135M, at the `smollm2` bench
section's batch (the `word` task with the chat template, 4 prompts x 4 completions of 64 tokens,
one micro-batch), on one fixed rollout batch decoded once: per preset, CPU seconds of
`OISDModule.accumulate` (every micro-batch's forward and backward; no rollout, optimizer or
logging), the presets in a rotated order in each of `--rounds` paired rounds in one process, one
thread. The `smollm2` section times each preset's first Lightning step of a fresh fit, which also
counts the optimizer's first step and the fit's start; this isolates the work the presets differ in.
Printed and written: per round and preset the seconds, per round the ratio to GRPO's, and the
floor of one extra unembedding for this batch with the prompt counted once per group (the shared
prompt, the default) and once per row.

    OMP_NUM_THREADS=1 python benchmarks/smollm2_presets_step.py --rounds 4 --out benchmarks/results/smollm2_presets_step.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from oisd_lab.bench.common import PRESETS, NoEos, Settings, bench_config, bench_module, rotated
from oisd_lab.bench.smollm2 import OVERRIDES, floor_arithmetic
from oisd_lab.models import load_pretrained
from oisd_lab.rollout import generate
from oisd_lab.sources import load_source

PROMPTS, GENERATIONS, LENGTH = 4, 4, 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    policy, tok = load_pretrained("smollm2")
    s = Settings(prompts=PROMPTS, generations=GENERATIONS, max_len=LENGTH, micro=PROMPTS * GENERATIONS)
    presets = args.presets.split(",")
    cfgs = {m: bench_config(s, m, **OVERRIDES) for m in presets}
    source = load_source(cfgs["grpo"].task)
    problems = source.train_batch(0, PROMPTS, 0)
    prompts = [source.format_prompt(p.prompt, tok, chat=True) for p in problems]
    torch.manual_seed(0)
    data = generate(policy, NoEos(tok), prompts, GENERATIONS, LENGTH)
    adv = torch.linspace(-1.2, 1.2, len(data))
    modules = {m: bench_module(cfgs[m], policy, tok, source, (problems, data)) for m in presets}

    def step(m: str) -> float:
        policy.zero_grad(set_to_none=True)
        t0 = time.process_time()
        modules[m].accumulate(data.scored(adv), backward=torch.Tensor.backward)
        seconds = time.process_time() - t0
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.parameters())
        return seconds

    step("grpo")  # process warm-up
    cpu: dict[str, list[float]] = {m: [] for m in presets}
    for r in range(args.rounds):
        for m in rotated(tuple(presets), r):
            cpu[m].append(step(m))
        print(f"round {r + 1}: " + ", ".join(f"{m} {cpu[m][-1]:.2f} s" for m in presets), flush=True)
    ratios = {m: [a / b for a, b in zip(cpu[m], cpu["grpo"], strict=True)] for m in presets}
    floors = floor_arithmetic(policy.config, data.prompt_length, LENGTH, GENERATIONS)
    result = {"model": "smollm2", "batch": {"prompts": PROMPTS, "generations": GENERATIONS, "completion": LENGTH,
                                            "prompt_length": data.prompt_length, "micro_batch": PROMPTS * GENERATIONS},
              "shared_prompt": cfgs["grpo"].grpo.shared_prompt, "rounds": args.rounds, "cpu_s": cpu,
              "ratio_vs_grpo": ratios,
              "median_ratio_vs_grpo": {m: statistics.median(v) for m, v in ratios.items()},
              "range_ratio_vs_grpo": {m: [min(v), max(v)] for m, v in ratios.items()},
              "floor_per_token": floors["floor_per_token"], "floor_this_batch_whole_rows": floors["floor_this_batch"],
              "floor_this_batch_shared_prompt": floors["floor_this_batch_shared_prompt"]}
    for m in presets:
        print(f"{m}: median {statistics.median(cpu[m]):.2f} CPU s, {result['median_ratio_vs_grpo'][m]:.3f}x grpo "
              f"[{min(ratios[m]):.3f}, {max(ratios[m]):.3f}]", flush=True)
    print(f"floor: {result['floor_this_batch_shared_prompt']:.3f}x this batch with the shared prompt, "
          f"{result['floor_this_batch_whole_rows']:.3f}x with whole rows, {result['floor_per_token']:.3f}x per token")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
