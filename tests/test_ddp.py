"""Two CPU processes under Lightning DDP (gloo): ranks end with identical parameters, each rank rolls
out its own slice of the step's prompts with all G completions of a prompt on one rank, and the
per-rank advantages equal those of one process over the union of the ranks' rewards (with
`scale_rewards=batch`, where the std runs over the whole step's rewards across ranks)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

WORKER = Path(__file__).parent / "ddp_worker.py"
PROMPTS, G, STEPS = 2, 4, 3


def test_ddp_two_cpu_ranks_agree(tmp_path):
    from oisd_lab import losses
    from oisd_lab.config import compose
    from oisd_lab.sources import load_source

    overrides = ["strategy=ddp", "devices=2", "accelerator=cpu", f"max_steps={STEPS}", "method=oisd",
                 "grpo.scale_rewards=batch",
                 f"grpo.prompts_per_step={PROMPTS}", f"grpo.num_generations={G}",
                 "grpo.micro_batch_size=4", "grpo.max_completion_length=12", "log.every_n_steps=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OISD_LAB_CACHE": str(tmp_path / "cache"),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"}
    done = subprocess.run([sys.executable, str(WORKER), str(tmp_path), *overrides], env=env,
                          capture_output=True, text=True, timeout=500)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == 2 for r in ranks)

    p0, p1 = ranks[0]["params"], ranks[1]["params"]
    assert all(torch.equal(p0[k], p1[k]) for k in p0), "ranks diverged"
    assert any(not torch.equal(p0[k], ranks[0]["start"][k]) for k in p0), "no update happened"

    cfg = compose(overrides)
    source = load_source(cfg.task)
    g = cfg.grpo
    for step, (a, b) in enumerate(zip(ranks[0]["records"], ranks[1]["records"], strict=True)):
        assert a["step"] == b["step"] == step + 1
        union = [p.prompt for p in source.train_batch(step, PROMPTS * 2, cfg.seed)]
        assert a["prompts"] == union[:PROMPTS] and b["prompts"] == union[PROMPTS:]
        rewards = torch.cat([a["rewards"], b["rewards"]])
        assert rewards.numel() == 2 * PROMPTS * G
        one_process = losses.group_advantages(rewards, G, g.scale_rewards, g.adv_eps, g.std_ddof)
        assert torch.equal(one_process, torch.cat([a["advantages"], b["advantages"]]))
        assert one_process.abs().sum() > 0
