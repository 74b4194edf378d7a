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
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["mode"] == "cpu" and result["pytest_gpu"] is None
    _check_result(result, gpu.CPU_CASES)
    assert "results in" in done.stdout


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
    result = gpu.main(["--tiny", "--no-pytest", "--out", str(tmp_path / "check.json")])
    _check_result(result, gpu.CPU_CASES)
    phases = result["models"][gpu.CPU_CASES[0].name]["methods"]["oisd"]["phases"]
    assert all(p["peak_bytes"] > 0 for p in phases.values())
