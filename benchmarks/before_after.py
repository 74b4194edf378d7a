"""Before/after of a loss-code change on SmolLM2-135M, in paired rounds in one process.

The "before" variant is `oisd_lab/losses.py` as of a git commit, loaded as its own module; its
`token_logps`, `entropy_from_logits` and `chunked_lens_jsd` replace the current ones (which
`oisd_lab.step` looks up at call time) while that variant runs. Each round times one loss forward
and backward (`OISDModule.loss_terms` + `backward`, one micro-batch) per (preset, variant),
alternating the variants and rotating the order, on one fixed rollout of random tokens.

    PYTHONPATH=. python benchmarks/before_after.py --before <commit> --out results/x.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SWAPPED = ("token_logps", "entropy_from_logits", "chunked_lens_jsd")


def _losses_at(commit: str):
    """`oisd_lab/losses.py` at `commit`, imported as a stand-alone module."""
    src = subprocess.run(["git", "show", f"{commit}:oisd_lab/losses.py"], check=True, capture_output=True,
                         text=True).stdout
    path = Path(tempfile.mkdtemp(prefix="oisd_before_")) / "losses_before.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("losses_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="git commit of the 'before' losses.py")
    parser.add_argument("--presets", default="grpo,oisd")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--prompt-len", dest="prompt_len", type=int, default=40)
    parser.add_argument("--completion-len", dest="completion_len", type=int, default=64)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from oisd_lab import losses
    from oisd_lab.bench.common import Settings, bench_config, bench_module, quiet_logs
    from oisd_lab.models import load_pretrained
    from oisd_lab.sources import load_source
    from oisd_lab.synthetic import VocabOnly, synthetic_rollout

    quiet_logs()
    variants = {"after": {n: getattr(losses, n) for n in SWAPPED},
                "before": {n: getattr(_losses_at(args.before), n) for n in SWAPPED}}
    policy, tok = load_pretrained("smollm2")
    s = Settings(prompts=args.rows // 4, generations=4, max_len=args.completion_len, micro=args.rows)
    rollout = synthetic_rollout(VocabOnly(len(tok)), args.rows, args.prompt_len, args.completion_len)
    adv = torch.linspace(-1.5, 1.5, args.rows)
    norm = dict(num_items_in_batch=rollout.completion_mask.sum(), num_sequences=args.rows,
                max_completion_length=args.completion_len)
    presets = args.presets.split(",")
    modules = {m: bench_module(bench_config(s, m, model="smollm2"), policy, tok, load_source(bench_config(s, m).task)) for m in presets}
    runs = [(m, v) for m in presets for v in variants]
    times: dict[str, dict[str, list[float]]] = {f"{m}/{v}": {"cpu": [], "wall": []} for m, v in runs}

    def one(m: str, v: str) -> None:
        for name, fn in variants[v].items():
            setattr(losses, name, fn)
        policy.zero_grad(set_to_none=True)
        w0, c0 = time.perf_counter(), time.process_time()
        modules[m].loss_terms(rollout.scored(adv), norm)["loss/total"].backward()
        times[f"{m}/{v}"]["wall"].append(time.perf_counter() - w0)
        times[f"{m}/{v}"]["cpu"].append(time.process_time() - c0)

    one(presets[0], "after")  # warm-up, not recorded
    times[f"{presets[0]}/after"] = {"cpu": [], "wall": []}
    loads = [os.getloadavg()]
    for r in range(args.rounds):
        for m, v in runs[r % len(runs):] + runs[: r % len(runs)]:
            one(m, v)
        loads.append(os.getloadavg())
        print(f"round {r}: " + ", ".join(f"{k} {t['cpu'][-1]:.2f}" for k, t in times.items()), flush=True)
    for name, fn in variants["after"].items():
        setattr(losses, name, fn)
    out = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "before": args.before, "load_avg": loads,
           "rows": args.rows, "prompt_len": args.prompt_len, "completion_len": args.completion_len,
           "times": {k: {c: _stats(t[c]) for c in t} for k, t in times.items()}, "ratios": {}}
    for c in ("cpu", "wall"):
        for m in presets:
            after, before = times[f"{m}/after"][c], times[f"{m}/before"][c]
            out["ratios"][f"{m} after/before ({c})"] = _stats([a / b for a, b in zip(after, before, strict=True)])
            if m != "grpo":
                for v in variants:
                    own, base = times[f"{m}/{v}"][c], times[f"grpo/{v}"][c]
                    out["ratios"][f"{m}/grpo {v} ({c})"] = _stats([a / b for a, b in zip(own, base, strict=True)])
    for k, st in out["ratios"].items():
        print(f"{k:<32} {st['median']:.3f} [{st['min']:.3f}, {st['max']:.3f}]")
    if args.out:
        args.out.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
