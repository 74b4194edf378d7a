"""The GPU check (`bash benchmarks/gpu/run.sh`): its CPU mode end to end through the shell script,
the real model shapes it builds, and (marked `gpu`) its tiny case on a CUDA device."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from oisd_lab.bench import gpu

ROOT = Path(__file__).resolve().parents[1]


def _check_result(result: dict, cases) -> None:
    assert list(result["models"]) == [c.name for c in cases]
    for case in cases:
        res = result["models"][case.name]
        decode = res["decode"]
        assert decode["rows"] == case.decode_prompts * case.generations and decode["new_tokens"] == case.decode_tokens
        assert decode["tokens_per_s"] > 0
        for method in ("grpo", "oisd"):
            m = res["methods"][method]
            assert set(m["phases"]) == {"rollout", "diagnostics", "forward_backward"}
            assert all(p["calls"] == gpu.STEPS + 1 and p["seconds"] > 0 for p in m["phases"].values())
            assert m["weights_changed_fraction"] >= 0.9  # lr 1e-6 under the paper recipe's precision
            assert (m["precision"], m["lr"]) == ("bf16-mixed", 1e-6) and m["student_layers"]
        assert "loss/think" in res["methods"]["oisd"]["losses"] and "loss/attn" in res["methods"]["oisd"]["losses"]
        assert "loss/think" not in res["methods"]["grpo"]["losses"]
        ratio = res["ratios"]["forward_backward_time"]
        assert ratio > 0 and res["ratios"]["alignment_seconds"] == pytest.approx(
            res["methods"]["oisd"]["phases"]["forward_backward"]["seconds"]
            - res["methods"]["grpo"]["phases"]["forward_backward"]["seconds"])


@pytest.mark.slow
def test_cpu_mode_of_the_one_command(tmp_path):
    out = tmp_path / "check.json"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", "benchmarks/gpu/run.sh", "--cpu", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["mode"] == "cpu" and result["pytest_gpu"] is None
    _check_result(result, gpu.CPU_CASES)
    _check_sharded(result["sharded"], ranks=2)
    assert result["sharded"]["backend"] == "gloo"
    assert "results in" in done.stdout


def _check_sharded(sharded: dict, ranks: int) -> None:
    """The sharded part: the tiny OISD run trained (gradients in both channels on every step, the
    exported model loads), and the paper recipe ran its 2 steps with each rank's peak within 10% of the plan."""
    assert sharded["ranks"] == ranks
    tiny = sharded["tiny"]
    assert tiny["exit_status"] == 0, tiny.get("log_tail")
    assert tiny["steps_logged"] == [1, 2, 3] and "strategy=fsdp" in tiny["command"]
    assert all(g > 0 for g in tiny["grad_norm"]) and all(g > 0 for g in tiny["grad/think/norm"])
    assert any(f < 1 for f in tiny["frac_reward_zero_std"])
    assert tiny["final_model_parameters"] > 0
    recipe = sharded["recipe"]
    assert recipe["exit_status"] == 0, recipe.get("log_tail")
    assert recipe["steps_logged"] == [1, 2]
    assert recipe["model"]["vocab_size"] == 151936 and recipe["model"]["num_layers"] == 8
    assert sorted(recipe["planned_vs_measured"]) == [f"rank{r}" for r in range(ranks)]
    for rank, row in recipe["planned_vs_measured"].items():
        assert abs(row["ratio"] - 1) < 0.10, (rank, row)


@pytest.mark.parametrize(("config", "non_embedding", "total"),
                         [(gpu.QWEN3_0_6B, 0.44e9, 0.60e9), (gpu.QWEN3_4B, 3.6e9, 4.02e9)])
def test_real_configs_have_the_model_cards_sizes(config, non_embedding, total):
    """Built on the meta device (no memory): the parameter counts the model cards state."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(Qwen3Config(**config))
    n = sum(p.numel() for p in model.parameters())
    embedding = config["vocab_size"] * config["hidden_size"]
    assert n == pytest.approx(total, rel=0.01)
    assert n - embedding == pytest.approx(non_embedding, rel=0.02)


def test_gpu_cases_keep_the_real_width():
    for case in gpu.GPU_CASES:
        real = case.config
        assert case.layers <= real["num_hidden_layers"] and real["vocab_size"] == 151936
        assert 1024 <= case.completion_len <= 2048
    shape = gpu.recipe_shape(cpu=False)
    assert (shape.hidden_size, shape.intermediate_size, shape.vocab_size) == (2560, 9728, 151936)
    assert (shape.num_attention_heads, shape.num_key_value_heads, shape.head_dim) == (32, 8, 128)
    from oisd_lab.config import compose

    student = compose(["accelerator=cpu"], config_name="paper/qwen3-4b-oisd").method.layers
    assert max(student) < shape.num_layers - 1  # the recipe's student layer exists at the cut depth


def test_phases_time_each_call_and_skip_the_warm_up():
    phases = gpu.Phases(torch.device("cpu"))
    work = phases.wrap("x", lambda n: sum(range(n)))
    assert [work(n) for n in (10, 10_000, 10_000)] == [45, 49995000, 49995000]
    summary = phases.summary()["x"]
    assert summary["calls"] == 3 and summary["peak_bytes"] is None
    assert summary["seconds"] == statistics.median(phases.seconds["x"][1:])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tiny_case_on_cuda(tmp_path):
    result = gpu.main(["--tiny", "--no-pytest", "--no-sharded", "--out", str(tmp_path / "check.json")])
    _check_result(result, gpu.CPU_CASES)
    phases = result["models"][gpu.CPU_CASES[0].name]["methods"]["oisd"]["phases"]
    assert all(p["peak_bytes"] > 0 for p in phases.values())
