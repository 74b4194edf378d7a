"""One optimisation step's forward and backward at the real 151,936-token vocabulary on a model
whose unembedding is nearly all the compute: a 2-layer, width-64 Qwen3, 2 prompts x 4 completions
of 1,000 tokens (48-token prompts), micro-batch 4, one thread. `grpo` and `oisd` alternate in one
process (paired rounds); per preset: CPU seconds of `OISDModule.accumulate` (every micro-batch's
forward and backward) and the peak of tensor memory (torch profiler), with the floor arithmetic of
OISD's extra work.

    OMP_NUM_THREADS=1 python benchmarks/real_vocab_step.py --rounds 2 --out benchmarks/results/real_vocab_step.json

`--first-forward-arm` adds `oisd_first_forward`: `oisd` with the recomputed chunks run by plain
non-reentrant checkpointing, so the first (discarded) forward of each chunk also forms the lens's
closed-form gradient, as the code did before it stopped doing so; paired with `oisd` in the same rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path
from unittest import mock

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from oisd_lab.config import compose
from oisd_lab.losses import divergence
from oisd_lab.models import build_char_tokenizer
from oisd_lab.module import OISDModule
from oisd_lab.rollout import Rollout
from oisd_lab.sampler import Sampler
from oisd_lab.sources import load_source
from oisd_lab.synthetic import profiler_peak

V, WIDTH, LAYERS = 151_936, 64, 2
PROMPTS, GENERATIONS, PROMPT_LEN, COMPLETION = 2, 4, 48, 1000


def build(seed: int = 0):
    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=V, hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         max_position_embeddings=PROMPT_LEN + COMPLETION + 8, tie_word_embeddings=False)
    return Qwen3ForCausalLM(config).eval()


def rollout(seed: int = 0) -> Rollout:
    g = torch.Generator().manual_seed(seed)
    n = PROMPTS * GENERATIONS
    ids = torch.randint(0, V, (n, PROMPT_LEN + COMPLETION), generator=g)
    lengths = COMPLETION - torch.arange(n) * 7  # unequal lengths, about 1,000 tokens
    completion_mask = (torch.arange(COMPLETION)[None] < lengths[:, None]).float()
    attention = torch.cat([torch.ones(n, PROMPT_LEN, dtype=torch.long), completion_mask.long()], 1)
    return Rollout(input_ids=ids, attention_mask=attention, completion_mask=completion_mask,
                   prompt_length=PROMPT_LEN, texts=[""] * n, truncated=lengths == COMPLETION)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--presets", default="grpo,oisd")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--first-forward-arm", action="store_true", help="add oisd_first_forward (module docstring)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tok, policy, data = build_char_tokenizer(), build(), rollout()
    adv = torch.linspace(-1.2, 1.2, len(data))
    modules, arms = {}, {}
    names = args.presets.split(",") + (["oisd_first_forward"] if args.first_forward_arm else [])
    for name in names:
        preset = "oisd" if name == "oisd_first_forward" else name
        arms[name] = (mock.patch.object(divergence, "_checkpointed", lambda fn, *a: divergence.checkpoint(
            fn, *a, use_reentrant=False)) if name == "oisd_first_forward" else contextlib.nullcontext())
        cfg = compose([f"method={preset}", f"grpo.prompts_per_step={PROMPTS}", f"grpo.num_generations={GENERATIONS}",
                       f"grpo.max_completion_length={COMPLETION}", "grpo.micro_batch_size=4"])
        source = load_source(cfg.task)
        modules[name] = OISDModule(cfg, policy, tok, Sampler(cfg, policy, tok, source, source.reward))

    def step(name):
        module = modules[name]
        policy.zero_grad(set_to_none=True)
        with arms[name]:
            module.accumulate(data.scored(adv), backward=torch.Tensor.backward)
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.parameters())

    cpu = {name: [] for name in modules}
    for _ in range(args.rounds):
        for name in modules:
            t0 = time.process_time()
            step(name)
            cpu[name].append(time.process_time() - t0)
            print(f"{name}: {cpu[name][-1]:.1f} CPU s", flush=True)
    peaks = {name: profiler_peak(lambda n=name: step(n)) for name in modules}
    tokens = int(data.completion_mask.sum())
    result = {"shape": {"vocab": V, "width": WIDTH, "layers": LAYERS, "rows": len(data), "completion_tokens": tokens,
                        "micro_batch": 4},
              "cpu_s": cpu, "median_cpu_s": {k: statistics.median(v) for k, v in cpu.items()},
              "peak_bytes": peaks}
    if "grpo" in cpu:
        result["ratio_vs_grpo"] = {k: result["median_cpu_s"][k] / result["median_cpu_s"]["grpo"] for k in cpu}
    for name in modules:
        print(f"{name}: median {result['median_cpu_s'][name]:.1f} CPU s, peak {peaks[name] / 2**30:.2f} GiB"
              + (f", {result['ratio_vs_grpo'][name]:.2f}x grpo" if "ratio_vs_grpo" in result else ""), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
