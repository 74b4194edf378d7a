"""`oisd-lab bench`: step time, loss memory and the TRL comparison, measured side by side.

Every time is taken on two clocks: wall seconds and the process's CPU seconds (`time.process_time`).
With one torch thread (the default here) CPU seconds equal wall seconds on an idle machine, and
on a shared one they leave out the time the process waits for a core, which is most of the noise.

Sections (`--sections`, default all):

- `presets`: every method preset on the same policy. Per round and preset: the weights are reset,
  then `--steps` + 1 Lightning steps on ONE fixed rollout batch (the optimisation step alone:
  scoring, forward/backward, optimizer) and `--steps` + 1 full steps (generation included, same
  seeds, so the first rollout is identical across presets; the per-layer diagnostics hook on,
  as in `oisd-lab train`). The first step of every fit is a warm-up and is dropped (it is also
  the diagnostics step, timed on its own). Presets run round-robin, the starting preset rotating
  per round, so that load changes on a shared machine hit every preset alike; ratios to `grpo`
  are paired per round. Phases are the module's own stage timers (`time/rollout`, `time/forward_backward`).
- `memory`: peak memory of one loss forward+backward (`OISDModule.loss_terms` + backward, one
  micro-batch) at a large vocabulary, per preset, from the CPU allocator's own accounting as
  recorded by `torch.profiler` (profile_memory=True: every allocation and free made inside the
  region; the weights and inputs, allocated before, are not counted), cross-checked by sampling
  the process's resident set size every millisecond.
- `attn512`: `grpo` against `oisd_attn` (and `oisd`) at long completions, on a fixed rollout
  batch, plus the time of generating that batch (EOS suppressed), so the added cost is given
  against the optimisation step and against the full step.
- `trl`: the same GRPO work through TRL's `GRPOTrainer` (same tiny model, prompts, reward,
  num_generations, lengths, batch, micro-batch, loss_type dapo, beta 0, fp32, no gradient
  checkpointing, no vLLM) and through `oisd-lab`'s Lightning loop, alternating in one process.
  Step time runs from one optimizer-step end to the next (everything a step costs: data,
  generation, scoring, loss, update, logging), first step dropped.
- `smollm2`: SmolLM2-135M (`--smol-model`, default the `smollm2` preset) on the `word` task with
  its chat template: decoding (ours against `model.generate`), every preset's optimisation step
  against `grpo`, the same GRPO work against TRL, a logging step's per-layer diagnostics, and the
  loss's peak memory at 256-token completions (see `smollm2.py`).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from .attn import bench_attn
from .common import PRESETS, QUICK, SECTIONS, Settings, machine_info, quiet_logs
from .memory import bench_memory
from .presets import bench_presets
from .smollm2 import bench_smollm2
from .tables import markdown, targets
from .versus_trl import bench_trl


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=None, help="write the results JSON here")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test, not a measurement")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    parser.add_argument("--init", default=None,
                        help="policy of the presets and trl sections: random (default), warm (the cached "
                             "warm start, built if missing) or a checkpoint directory")
    parser.add_argument("--presets", default=",".join(PRESETS), help="method presets to time")
    parser.add_argument("--repeats", type=int, help="rounds per section (round-robin over presets)")
    parser.add_argument("--steps", type=int, help="timed steps per fit (one warm-up step more)")
    parser.add_argument("--threads", type=int, help="torch threads (default 1: the machine is shared)")
    parser.add_argument("--prompts", type=int, help="prompts per step")
    parser.add_argument("--max-len", dest="max_len", type=int, help="max_completion_length")
    parser.add_argument("--trl-steps", dest="trl_steps", type=int, help="timed steps per TRL/ours fit")
    parser.add_argument("--mem-vocab", dest="mem_vocab", type=int, help="vocabulary of the memory section")
    parser.add_argument("--mem-tokens", dest="mem_tokens", type=int, help="completion tokens of the memory section")
    parser.add_argument("--attn-len", dest="attn_len", type=int, help="completion length of attn512")
    parser.add_argument("--smol-model", dest="smol_model", help="model of the smollm2 section (name or path)")
    parser.add_argument("--smol-rounds", dest="smol_rounds", type=int, help="rounds of the smollm2 section")


def settings_from(args: argparse.Namespace) -> Settings:
    s = Settings(**(QUICK if args.quick else {}))
    for name in ("repeats", "steps", "threads", "prompts", "max_len", "trl_steps", "mem_vocab", "mem_tokens",
                 "attn_len", "init", "smol_model", "smol_rounds"):
        if getattr(args, name, None) is not None:
            setattr(s, name, getattr(args, name))
    s.sections = tuple(x for x in args.sections.split(",") if x)
    s.presets = tuple(x for x in args.presets.split(",") if x)
    unknown = [x for x in s.sections if x not in SECTIONS] + [x for x in s.presets if x not in PRESETS]
    if unknown:
        raise SystemExit(f"error: bench: unknown section or preset {unknown}")
    if "grpo" not in s.presets:
        s.presets = ("grpo", *s.presets)  # every ratio is over grpo
    return s


def run(args: argparse.Namespace) -> int:
    s = settings_from(args)
    quiet_logs()
    torch.set_num_threads(s.threads)
    result = {"meta": machine_info(s, quick=args.quick)}
    for name in s.sections:
        load = os.getloadavg()
        start = time.perf_counter()
        result[name] = SECTION_FUNCS[name](s)
        result[name]["load_avg"] = {"start": load, "end": os.getloadavg()}
        result[name]["seconds"] = time.perf_counter() - start
        print(f"[bench] {name} done in {result[name]['seconds']:.0f} s", flush=True)
    result["targets"] = targets(result)
    print(markdown(result, title="oisd-lab bench"))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, default=float) + "\n")
        print(f"wrote {args.out}")
    return 0


SECTION_FUNCS = {"presets": bench_presets, "memory": bench_memory, "attn512": bench_attn, "trl": bench_trl,
                 "smollm2": bench_smollm2}
