"""Sharding does not change the objective: two CPU ranks under `strategy=fsdp` and under
`strategy=ddp`, each with `grpo.prompts_per_step=2`, end an OISD run with the parameters of one
process with `grpo.prompts_per_step=4` on the same global batch and the same rollouts (every rank
rolls out the whole step under one seed per batch and keeps its rows). The split: rank r takes
prompts 2r, 2r+1 of the step and their G completions; micro-batches are cut per rank; the token
normaliser is averaged over ranks and so are the gradients, so each rank's contribution is its
token sum over the global mean count, halved: the one-process sum over the global count."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port

pytestmark = pytest.mark.slow

WORKER = Path(__file__).parent / "ddp_worker.py"
ARGS = ["accelerator=cpu", "max_steps=3", "method=oisd", "grpo.num_generations=4", "grpo.micro_batch_size=4",
        "grpo.max_completion_length=12", "log.every_n_steps=1", "grpo.num_iterations=2"]
RANKS, PROMPTS = 2, 2


def _launch(out: Path, port: int, extra: list[str], strategies: str = "") -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OISD_LAB_CACHE": str(out / "cache"), "GLOBAL_SEEDED": "1",
           "STRATEGIES": strategies, "MASTER_PORT": str(port), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "WANDB_MODE": "disabled"}
    done = subprocess.run([sys.executable, str(WORKER), str(out), *ARGS, *extra], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("one_process")
    _launch(out / "one", free_port(), ["devices=1", f"grpo.prompts_per_step={RANKS * PROMPTS}"])
    _launch(out / "two", free_port(), [f"devices={RANKS}", f"grpo.prompts_per_step={PROMPTS}"], "fsdp ddp")
    runs = {"one": torch.load(out / "one" / "rank0.pt", weights_only=False)}
    for s in ("fsdp", "ddp"):
        runs[s] = [torch.load(out / "two" / s / f"rank{r}.pt", weights_only=False) for r in range(RANKS)]
    return runs


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_two_ranks_equal_one_process(runs, strategy):
    one, ranks = runs["one"], runs[strategy]
    assert [r["world_size"] for r in ranks] == [RANKS] * RANKS and one["world_size"] == 1
    # the same global batch and rollouts: rank r's prompts and rewards are rows r of the one process's
    for step, parts in enumerate(zip(*(r["records"] for r in ranks), strict=True)):
        whole = one["records"][step]
        assert sum((p["prompts"] for p in parts), []) == whole["prompts"]
        assert torch.equal(torch.cat([p["rewards"] for p in parts]), whole["rewards"])
        assert torch.allclose(torch.cat([p["advantages"] for p in parts]), whole["advantages"], atol=1e-6)
        assert whole["advantages"].abs().sum() > 0
    assert len(one["records"]) == 3
    start = one["start"]
    update = max((one["params"][k] - start[k]).abs().max().item() for k in start)
    assert update > 1e-5, "no update happened"
    for rank in ranks:
        assert torch.equal(rank["start"]["lm_head.weight"], start["lm_head.weight"])
        diff = max((rank["params"][k] - one["params"][k]).abs().max().item() for k in start)
        # float32 summation order only (per-rank partial sums, then the all-reduce / reduce-scatter):
        # measured 3.4e-7 (fsdp) and 3.0e-7 (ddp) against a largest update of 9.0e-5 after three AdamW
        # steps; per-rank token normalisers without the average over ranks give 1.3e-4 (fails)
        assert diff < 0.05 * update, (strategy, diff, update)


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_the_gradient_view_is_global_and_equals_one_process(runs, strategy):
    """Every logging step's `grad/*` figures (per-term norms, ratios and cosines, Adam's view, the
    divergences by advantage sign, the batch's advantage figures) on each rank equal the one-process
    run's: they describe the global update and the whole batch."""
    one = {r["step"]: r for r in runs["one"]["metrics"]}
    compared = 0
    for rank in runs[strategy]:
        for row in rank["metrics"]:
            whole = one[row["step"]]
            keys = [k for k in row if k.startswith("grad/")]
            assert keys and set(keys) <= set(whole)
            for key in keys:
                # Adam's view divides by sqrt(v) + eps, which magnifies the float32 summation-order noise
                # of near-zero gradient components (and its figures here are small, ~0.08): measured
                # 0.0046 apart under fsdp and 0.0006 under ddp at step 2; the rest agree to 2e-3
                tol = dict(rel=0, abs=1e-2) if "/adam_" in key else dict(rel=2e-3, abs=1e-6)
                assert row[key] == pytest.approx(whole[key], **tol), (strategy, row["step"], key)
                compared += 1
    assert compared > 0
