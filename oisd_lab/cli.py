"""`oisd-lab` command line: each subcommand is a thin call into the package.

    oisd-lab train [key=value ...]      GRPO / OISD run (no arguments: the main job)
    oisd-lab pretrain [key=value ...]   build (or reuse) the cached warm start
    oisd-lab eval PATH [key=value ...]  held-out greedy accuracy and Avg@K of a run or checkpoint
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .config import ConfigError


def _setup_env() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("WANDB_MODE", "offline")


def cmd_train(args) -> int:
    from .config import compose
    from .train import train

    cfg = compose(args.overrides)
    start = time.time()
    run_dir = train(cfg)
    print_summary(Path(run_dir), time.time() - start)
    print(run_dir)
    return 0


def print_summary(run_dir: Path, seconds: float) -> None:
    result = json.loads((run_dir / "eval.json").read_text())
    b, a = result["before"], result["after"]
    k = a["k"]
    print()
    print(f"{result['method']} on {result['task']} (seed {result['seed']}), {result['steps']} steps, "
          f"{seconds:.0f} s wall ({result['train_seconds']:.0f} s RL)")
    print(f"held-out ({a['n']} problems)   before   after")
    print(f"  greedy accuracy          {b['greedy_acc']:.3f}    {a['greedy_acc']:.3f}")
    print(f"  avg@{k}                    {b['avg_at_k']:.3f}    {a['avg_at_k']:.3f}")
    print("run directory:")


def cmd_pretrain(args) -> int:
    from .config import compose
    from .pretrain import warm_start

    cfg = compose(args.overrides)
    print(warm_start(cfg))
    return 0


def cmd_eval(args) -> int:
    from .train import evaluate_path

    result = evaluate_path(Path(args.path), args.overrides)
    print(json.dumps({k: v for k, v in result.items() if not k.startswith("per_problem")}, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="oisd-lab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn, helptext in (
        ("train", cmd_train, "run GRPO/OISD; key=value overrides (method=oisd task=linear seed=1 ...)"),
        ("pretrain", cmd_pretrain, "build the cached warm-start checkpoint for a tiny model and task"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("overrides", nargs="*", help="key=value config overrides")
        p.set_defaults(fn=fn)
    p = sub.add_parser("eval", help="evaluate a run directory or checkpoint on the held-out split")
    p.add_argument("path", help="a run directory or a checkpoint directory")
    p.add_argument("overrides", nargs="*", help="key=value config overrides (task=..., task.num_test=...)")
    p.set_defaults(fn=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    _setup_env()
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume from the last checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
