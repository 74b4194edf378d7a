"""`oisd-lab plan`: peak memory per device of a config before launch, and where it comes from.

    oisd-lab plan --config paper/qwen3-4b-oisd --gpu-memory 80
    oisd-lab plan model=smollm2 method=oisd accelerator=cpu --gpu-memory 16

The training step is traced on fake tensors from the model's config alone (no weights, no GPU,
no network): parameters, gradients, optimizer state, the policy forward and backward, the
vocabulary-sized blocks, the alignment losses, the per-layer diagnostics, the reference model.
The rollout's KV cache, DDP buckets, FSDP sharding, fragmentation and fixed CUDA/NCCL overheads
are formulas (`formulas.py`). When the run does not fit, settings that fit are searched.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .planner import FULL_DEPTH_LIMIT, Plan, make_plan, trace_key, world_size
from .report import GIB, format_plan

__all__ = ["plan", "Plan", "make_plan", "format_plan", "add_arguments", "run"]


def plan(cfg, memory_gib: float | None = None, prompt_length: int | None = None,
         max_layers: int = FULL_DEPTH_LIMIT, search: int = 4, prompt_source: str | None = None) -> Plan:
    """The plan of `cfg`; when it does not fit `memory_gib`, up to three settings that do, found
    with at most `search` more traces. `prompt_source`: where `prompt_length` comes from, for the
    report."""
    # on use: the planner builds models and traces the step only when a plan is made
    from .suggest import suggest

    cache: dict = {}
    memory = round(memory_gib * GIB) if memory_gib else None
    result = make_plan(cfg, prompt_length, max_layers, cache, device_memory=memory)
    if prompt_source:
        result.setup["prompt_length_source"] = prompt_source
    if memory is None or result.fits(memory) or search <= 0:
        return result
    length = result.setup["prompt_length"]
    limit = len(cache) + search

    def plan_fn(variant):
        if trace_key(variant, length, max_layers) not in cache and len(cache) >= limit:
            return None
        return make_plan(variant, length, max_layers, cache, device_memory=memory)

    result.suggestions = suggest(cfg, plan_fn, memory, world_size(cfg))
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    parser.add_argument("--config", default="train", metavar="NAME",
                        help="config in experiments/ to start from (default train; e.g. paper/qwen3-4b-oisd)")
    parser.add_argument("--gpu-memory", dest="gpu_memory", type=float, default=80.0, metavar="GIB",
                        help="memory per device in GiB to check the plan against (default 80)")
    parser.add_argument("--prompt-length", dest="prompt_length", type=int, default=None, metavar="TOKENS",
                        help="prompt tokens (default: measured for synthetic tasks, else 512)")
    parser.add_argument("--trace-layers", dest="trace_layers", type=int, default=FULL_DEPTH_LIMIT, metavar="N",
                        help=f"trace models up to N layers whole; deeper ones at two cut depths, "
                             f"extrapolated per layer (default {FULL_DEPTH_LIMIT})")
    parser.add_argument("--search", type=int, default=4, metavar="N",
                        help="at most N more traces when searching settings that fit (0: no search)")
    parser.add_argument("--json", type=Path, default=None, help="also write the plan as JSON here")


def run(args: argparse.Namespace) -> int:
    # on use: the planner builds models and traces the step only when a plan is made
    from ..config import compose

    cfg = compose(args.overrides, config_name=args.config)
    result = plan(cfg, args.gpu_memory, args.prompt_length, args.trace_layers, args.search)
    print(format_plan(result, round(args.gpu_memory * GIB)))
    if args.json is not None:
        args.json.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return 0
