"""The per-layer diagnostics' share of a SmolLM2-135M run (the `smollm2` bench section's
diagnostics measurement: a two-step `grpo` fit whose step 1 logs) at several `log.diag_rollouts`
settings, one after the other in one process.

    OMP_NUM_THREADS=1 python benchmarks/smollm2_diag_share.py --out benchmarks/results/smollm2_diag_share.json
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

from oisd_lab.bench.common import Settings, bench_config
from oisd_lab.bench.smollm2 import OVERRIDES, _diagnostics, smol_settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--settings", default="0,8,4", help="comma list of log.diag_rollouts (0: the full pass)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from oisd_lab.models import load_pretrained
    from oisd_lab.sources import load_source

    s = Settings()
    sm = smol_settings(s)
    policy, tok = load_pretrained(s.smol_model)
    init = copy.deepcopy(policy.state_dict())
    results = {"batch": sm.prompts * sm.generations, "max_completion_length": sm.max_len, "runs": {}}
    for count in (int(x) for x in args.settings.split(",")):
        cfg = bench_config(sm, "grpo", **OVERRIDES, **{"log.diag_rollouts": count})
        source = load_source(cfg.task)
        fmt = lambda text, source=source: source.format_prompt(text, tok, chat=True)  # noqa: E731
        policy.load_state_dict(init)
        out = _diagnostics(sm, cfg, policy, tok, source, fmt)
        results["runs"][count] = out
        print(f"diag_rollouts={count}: {out['cpu']['diagnostics_per_log_step_s']:.1f} CPU s per logging step, "
              f"step {out['cpu']['full_step_s']:.1f} CPU s, amortised share "
              f"{100 * out['cpu']['amortised_share_of_step']:.1f}% (wall {100 * out['wall']['amortised_share_of_step']:.1f}%)",
              flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
