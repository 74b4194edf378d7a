"""`oisd-lab` command line: each subcommand is a thin call into the package.

    oisd-lab train [key=value ...]      GRPO / OISD run (no arguments: the main job)
    oisd-lab pretrain [key=value ...]   build (or reuse) the cached warm start
    oisd-lab eval PATH [key=value ...]  held-out greedy accuracy and Avg@K of a run or checkpoint
    oisd-lab launch --nodes N [...]     one multi-node training run on SLURM (sbatch script, --dry-run)
    oisd-lab grid FILE [key=value ...]  run an ablation grid (skips finished cells, resumes the rest)
    oisd-lab collect GRID_DIR           one tidy results table (+ aggregates) for a grid
    oisd-lab report GRID_DIR --out DIR  figures and tables of a grid
    oisd-lab power PILOT [--effect E]   seeds a target effect needs, from a pilot grid's variance
    oisd-lab bench                      step-time and memory benchmarks
    oisd-lab plan [key=value ...]       peak memory per device before launch, and settings that fit
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .config import compose
from .errors import ConfigError, RunError


def _setup_env() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("WANDB_MODE", "offline")


def cmd_train(args) -> int:
    # torch is imported by the subcommands that need it, so grid, collect and --help start without it
    from lightning.pytorch.utilities import rank_zero_only

    # on use: each subcommand imports only what it runs, so `oisd-lab --help` starts fast
    from .run.evaluation import report
    from .train import train

    cfg = compose(args.overrides, config_name=args.config)
    if cfg.grpo.rollout_backend == "vllm":
        # on use: each subcommand imports only what it runs, so `oisd-lab --help` starts fast
        from .extras import require_extra

        require_extra("vllm", "grpo.rollout_backend=vllm")
    start = time.time()
    run_dir = train(cfg)
    if rank_zero_only.rank != 0:  # other DDP ranks: rank 0 evaluates and reports
        return 0
    print(report(Path(run_dir), time.time() - start))
    print(run_dir)
    return 0


def cmd_pretrain(args) -> int:
    # torch is imported by the subcommands that need it (see cmd_train)
    from .models import TINY_PRESETS, is_tiny
    from .pretrain import warm_start

    cfg = compose(args.overrides, config_name=args.config)
    if not is_tiny(cfg.model.name) and not cfg.pretrain.init:
        raise ConfigError(f"model.name: '{cfg.model.name}' is not a tiny preset; pretrain builds warm starts for "
                          f"{', '.join(TINY_PRESETS)} (other models start RL as they are)")
    print(warm_start(cfg))
    return 0


def cmd_eval(args) -> int:
    # torch is imported by the subcommands that need it (see cmd_train)
    from .run.evaluation import evaluate_path, summary

    result = evaluate_path(Path(args.path), args.overrides)
    print(json.dumps(summary(result), indent=2))
    return 0


LAZY = {
    "launch": ("oisd_lab.launch", "one training run over several SLURM nodes: an sbatch script of one srun"),
    "grid": ("oisd_lab.grid", "run an ablation grid file from experiments/grids/"),
    "collect": ("oisd_lab.collect", "collect a grid's runs into results tables"),
    "report": ("oisd_lab.analysis.report", "write a grid's figures and tables"),
    "power": ("oisd_lab.analysis.sizing", "what a pilot grid can detect, and the seeds a target effect needs"),
    "bench": ("oisd_lab.bench", "benchmark step time, memory and the TRL comparison"),
    "plan": ("oisd_lab.plan", "memory plan of a config: peak per device, where it comes from, what fits"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="oisd-lab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn, helptext in (
        ("train", cmd_train, "run GRPO/OISD; key=value overrides (method=oisd task=linear seed=1 ...)"),
        ("pretrain", cmd_pretrain, "build the cached warm-start checkpoint for a tiny model and task"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("overrides", nargs="*", help="key=value config overrides")
        p.add_argument("--config", default="train", metavar="NAME",
                       help="config in experiments/ to start from (default train; e.g. paper/qwen3-4b-oisd)")
        p.set_defaults(fn=fn)
    p = sub.add_parser("eval", help="evaluate a run directory or checkpoint on the held-out split")
    p.add_argument("path", help="a run directory or a checkpoint directory")
    p.add_argument("overrides", nargs="*", help="key=value config overrides (task=..., task.num_test=...)")
    p.set_defaults(fn=cmd_eval)
    for name, (module, helptext) in LAZY.items():
        p = sub.add_parser(name, help=helptext)
        if name == command:  # only the chosen subcommand's module is imported
            _lazy(module).add_arguments(p)
            p.set_defaults(fn=lambda args, m=module: _lazy(m).run(args))
        else:
            p.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def _lazy(module: str):
    """Subcommand modules are imported only when the parser is built for them."""
    import importlib

    return importlib.import_module(module)


def main(argv: list[str] | None = None) -> int:
    _setup_env()
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv[0] if argv else None)
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may also follow options (`grid components --workers 2 seed=3`)
    stray = [item for item in extra if item.startswith("-") or "=" not in item]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        return args.fn(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RunError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume from the last checkpoint", file=sys.stderr)
        return 130
    except SystemExit as err:  # Lightning ends a run on SIGTERM with a code-less SystemExit (status 0)
        if type(err).__name__ != "SIGTERMException":
            raise
        print("terminated (SIGTERM); run the same command again to resume from the last checkpoint", file=sys.stderr)
        return 143


if __name__ == "__main__":
    raise SystemExit(main())
