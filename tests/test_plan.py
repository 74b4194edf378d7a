"""The memory plan: the tracker on hand-made sequences, the fake-tensor step against a real CPU
step measured as the benchmarks measure it, depth extrapolation against a full trace, the
formulas, the shipped configs (offline), the CLI and the run-folder files."""

from __future__ import annotations

import json

import pytest
import torch

from oisd_lab.config import compose
from oisd_lab.models import build_char_tokenizer
from oisd_lab.plan import formulas, plan
from oisd_lab.plan.measure import measure_step
from oisd_lab.plan.model_config import load_model_config, shipped_name
from oisd_lab.plan.planner import make_plan
from oisd_lab.plan.trace import _AllOnesMode, fake_mode
from oisd_lab.plan.tracker import MemoryTrace
from oisd_lab.sources import load_source

NOT_TRACED = ("parameters", "optimizer state", "reference model", "total")


def _narrow_qwen3(tmp_path) -> str:
    """A 2-layer, 64-wide Qwen3 with the real 151,936-token vocabulary, as a checkpoint folder."""
    folder = tmp_path / "qwen3-narrow"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "tie_word_embeddings": True, "max_position_embeddings": 1024}))
    return str(folder)


def test_tracker_counts_storages_once_and_frees_them():
    with MemoryTrace() as trace:
        a = torch.ones(1000)  # 4000 bytes
        view = a[10:20]  # same storage: nothing new
        with trace.label("b"):
            b = a * 2  # 4000 more
        assert trace.current == 8000 and trace.by_label == {"other": 4000, "b": 4000}
        del a  # the view still holds the storage
        assert trace.current == 8000
        del view
        assert trace.current == 4000
        c = torch.ones(250, dtype=torch.float64)  # 2000: below the peak
        del b, c
    assert trace.peak == 8000 and trace.at_peak == {"other": 4000, "b": 4000} and trace.current == 0


def test_all_ones_answers_match_a_real_all_true_mask():
    h, sel = torch.randn(3, 5, 4), torch.ones(3, 5, dtype=torch.bool)
    with fake_mode():
        fh, fsel = torch.randn(3, 5, 4), torch.ones(3, 5, dtype=torch.bool)
        with _AllOnesMode():
            picked, where, count = fh[fsel], fsel.nonzero(as_tuple=True), int(fsel.sum())
    assert picked.shape == h[sel].shape and [w.shape for w in where] == [w.shape for w in sel.nonzero(as_tuple=True)]
    assert count == 1  # the all-ones answer for any scalar read: only shapes matter to memory


CASES = {
    "tiny oisd, 2 micro-batches": ["method=oisd"],
    "tiny6m, 256-token completions": ["model=tiny6m", "method=oisd", "grpo.prompts_per_step=2",
                                      "grpo.num_generations=4", "grpo.micro_batch_size=4",
                                      "grpo.max_completion_length=256"],
    "tiny, checkpointing, KL to a reference": ["method=oisd_logit", "grpo.beta=0.04",
                                               "model.gradient_checkpointing=true"],
    "tiny oisd, LoRA rank 8": ["method=oisd", "model.lora_rank=8"],
}


def _case_overrides(case, tmp_path) -> list[str]:
    return CASES.get(case) or [f"model={_narrow_qwen3(tmp_path)}", "method=oisd", "grpo.prompts_per_step=2",
                               "grpo.num_generations=2", "grpo.micro_batch_size=2",
                               "grpo.max_completion_length=32"]


@pytest.mark.slow
@pytest.mark.parametrize("case", [*CASES, "qwen3 vocabulary 151,936"])
def test_planned_step_peak_is_within_5_percent_of_a_measured_cpu_step(case, tmp_path):
    over = _case_overrides(case, tmp_path)
    cfg = compose([*over, "accelerator=cpu", "log.gradient_view=false"])  # a step that is not a logging step
    planned = make_plan(cfg, prompt_length=24)
    step = planned.phases["policy step"]
    traced = sum(v for k, v in step.items() if k not in NOT_TRACED)
    measured = measure_step(cfg, prompt_length=24)
    assert abs(traced / measured["step"] - 1) < 0.05, (traced, measured["step"])
    total = measured["step"] + measured["parameters"] + measured["optimizer"]
    assert abs(step["total"] - step.get("reference model", 0) - total) / total < 0.05
    assert planned.state["parameters"] == measured["parameters"]
    assert planned.state["optimizer state"] == measured["optimizer"]


@pytest.mark.slow
@pytest.mark.parametrize("case", [*CASES, "qwen3 vocabulary 151,936"])
def test_a_logging_steps_gradient_view_is_planned_as_measured(case, tmp_path):
    """With the gradient view on (the default), the planned step is a logging step's: each term's
    gradient buffers, summed over micro-batches, held through the optimizer step. At the real
    vocabulary the buffers are a large part of the step (the unembedding's gradient per term), and
    the second micro-batch's forward runs while the first one's buffers are held."""
    over = _case_overrides(case, tmp_path)
    cfg = compose([*over, "accelerator=cpu"])
    planned = make_plan(cfg, prompt_length=24)
    step = planned.phases["policy step"]
    assert step["gradient view"] > 0
    without = make_plan(compose([*over, "accelerator=cpu", "log.gradient_view=false"]), prompt_length=24)
    assert step["total"] > without.phases["policy step"]["total"]
    traced = sum(v for k, v in step.items() if k not in NOT_TRACED)
    measured = measure_step(cfg, prompt_length=24)
    assert abs(traced / measured["step"] - 1) < 0.05, (traced, measured["step"])


def test_the_view_of_several_ranks_holds_the_policy_terms_own_gradient():
    """One process derives the policy term's gradient from `.grad` after the last micro-batch;
    under DDP and FSDP (and fp16's scaler) it gets a backward pass of its own, whose per-parameter
    sums are held from the first micro-batch on: at least one more model-sized buffer."""
    one = make_plan(compose(["accelerator=cpu", "method=oisd"]), 20)
    ddp = make_plan(compose(["accelerator=cpu", "method=oisd", "devices=2", "strategy=ddp"]), 20)
    n = one.setup["parameters"]
    assert ddp.phases["policy step"]["gradient view"] - one.phases["policy step"]["gradient view"] >= 4 * n


@pytest.mark.parametrize("checkpointing", ["false", "true"])
def test_depth_extrapolation_matches_the_full_trace(checkpointing):
    cfg = compose(["model=tiny6m", "method=oisd", "grpo.prompts_per_step=2", "grpo.max_completion_length=48",
                   f"model.gradient_checkpointing={checkpointing}"])
    full, cut = make_plan(cfg, 20), make_plan(cfg, 20, max_layers=4)
    assert "full depth (8 layers)" in full.method and "2 and 4 layers" in cut.method
    assert cut.state == full.state  # parameters, gradients, optimizer state: linear in depth, exactly
    for phase, parts in full.phases.items():
        assert cut.phases[phase]["total"] == pytest.approx(parts["total"], rel=0.01)


@pytest.mark.slow
def test_precisions_set_parameter_optimizer_and_activation_dtypes():
    assert formulas.precision_dtypes("bf16-true", "float32") == (torch.bfloat16, None)
    assert formulas.precision_dtypes("bf16-mixed", "float32") == (torch.float32, torch.bfloat16)
    assert formulas.precision_dtypes("bf16-mixed", "bfloat16") == (torch.bfloat16, torch.bfloat16)
    with pytest.raises(ValueError, match="precision: unknown value 'fp8'"):
        formulas.precision_dtypes("fp8", "float32")
    true = make_plan(compose(["precision=bf16-true", "grpo.optimizer=adamw_kahan", "accelerator=cpu"]), 20)
    mixed = make_plan(compose(["precision=bf16-mixed", "accelerator=cpu"]), 20)
    n = true.setup["parameters"]
    assert true.state["parameters"] == 2 * n and mixed.state["parameters"] == 4 * n  # fp32 master weights
    # AdamW's two moments in fp32; Kahan-summed AdamW's moments and compensation buffer in bf16
    assert 6 * n <= true.state["optimizer state"] < 6.01 * n and 8 * n <= mixed.state["optimizer state"] < 8.01 * n
    # the KV cache is in the compute dtype: bf16 for both
    assert true.phases["rollout"]["KV cache"] == mixed.phases["rollout"]["KV cache"]


def test_kv_cache_formula_by_hand():
    # Qwen3-4B: 36 layers x 8 KV heads x 128 dims, keys and values, bf16: 147,456 bytes a token
    assert formulas.kv_cache_bytes(36, 8, 128, 1, 1, 2) == 147_456
    assert formulas.kv_cache_bytes(36, 8, 128, 64, 2560, 2) == 147_456 * 64 * 2560
    assert formulas.ddp_bucket_bytes(100, 1) == 0 and formulas.ddp_bucket_bytes(100, 8) == 100
    assert formulas.fsdp_shard(10, 4) == 3
    # per-layer FSDP: 100 parameters, 4 layers of 20, root 20; root + 2 layers gathered, 2 bytes each
    assert formulas.fsdp_gathered_bytes(100, 20, 4, 2, 2) == (20 + 2 * 20) * 2
    assert formulas.fsdp_gathered_bytes(100, 20, 4, 9, 2) == 100 * 2  # never more than the model
    # gathering a unit of 100 parameters over 8 ranks in bf16: the all-gather output (padded to 104)
    # and, under mixed precision, this rank's shard cast to bf16 (13)
    assert formulas.fsdp_gather_buffer_bytes(100, 8, 2, cast=True) == (104 + 13) * 2
    assert formulas.fsdp_gather_buffer_bytes(100, 8, 2, cast=False) == 104 * 2


@pytest.mark.slow
def test_a_narrow_model_with_a_large_vocabulary_peaks_in_the_rollout_while_the_root_is_gathered(tmp_path):
    """Under FSDP the rollout gathers the root (embedding and unembedding) first; while it is copied
    out of the all-gather buffer, three copies of it are live. With 64-wide layers and V = 151,936 that
    moment is above the decoding's (measured on 2 CPU ranks: benchmarks/results/paper_recipe_cpu.json,
    rollout 1.00 of this plan); a model as wide as Qwen3-0.6B peaks while decoding."""
    base = ["method=oisd", "accelerator=cpu", "devices=2", "strategy=fsdp", "precision=bf16-mixed",
            "model.dtype=float32", "grpo.prompts_per_step=2", "grpo.num_generations=2",
            "grpo.micro_batch_size=2", "grpo.max_completion_length=8"]
    narrow = make_plan(compose([f"model={_narrow_qwen3(tmp_path)}", *base]), 161).phases["rollout"]
    root = 151936 * 64 + 64  # tied embedding and the final norm, bf16
    assert narrow["FSDP gathered parameters"] == 2 * root
    assert narrow["FSDP all-gather buffers"] == 2 * root + 2 * (root // 2)  # the gather's output, the cast shard
    assert "KV cache" not in narrow
    wide = make_plan(compose(["model=Qwen/Qwen3-0.6B", *base]), 161).phases["rollout"]
    assert "FSDP all-gather buffers" not in wide and wide["KV cache"] > 0


@pytest.mark.slow
def test_strategies_share_the_trace_and_move_the_state():
    cache: dict = {}
    # a step that is not a logging step (with the gradient view FSDP gathers the whole model, below)
    base = ["accelerator=gpu", "devices=8", "precision=bf16-true", "grpo.optimizer=adamw_kahan",
            "log.gradient_view=false"]
    ddp = make_plan(compose([*base, "strategy=ddp"]), 20, cache=cache)
    fsdp = make_plan(compose([*base, "strategy=fsdp"]), 20, cache=cache)
    assert len(cache) == 1  # one trace for both
    assert ddp.state["DDP gradient buckets"] == ddp.state["gradients"]
    assert fsdp.state["parameters"] == -(-ddp.state["parameters"] // 8)
    assert fsdp.phases["rollout"]["FSDP gathered parameters"] == ddp.state["parameters"]
    assert fsdp.phases["policy step"]["FSDP gathered parameters"] < ddp.state["parameters"] / 2
    assert ddp.required > ddp.peak * 1.1  # fragmentation, CUDA context and NCCL on GPU
    viewed = make_plan(compose([*base[:-1], "strategy=fsdp"]), 20, cache=cache)
    assert len(cache) == 2  # the gradient view is another trace
    assert viewed.phases["policy step"]["FSDP gathered parameters"] == ddp.state["parameters"]


def test_fsdp_over_two_nodes_shards_over_every_rank():
    cache: dict = {}
    base = ["accelerator=gpu", "precision=bf16-mixed", "model.dtype=float32", "strategy=fsdp"]
    one = make_plan(compose([*base, "devices=8"]), 20, cache=cache)
    two = make_plan(compose([*base, "devices=8", "num_nodes=2"]), 20, cache=cache)
    assert (one.setup["world"], two.setup["world"]) == (8, 16)
    assert two.state["parameters"] == -(-4 * one.setup["parameters"] // 16)
    assert two.state["optimizer state"] < one.state["optimizer state"] * 0.51


# Parameter counts published with each model.
SHIPPED = {"Qwen/Qwen3-4B": 4_022_468_096, "Qwen/Qwen3-8B": 8_190_735_360, "Qwen/Qwen3-0.6B": 596_049_920,
           "OctoThinker/OctoThinker-3B-Long-Base": 3_212_749_824, "HuggingFaceTB/SmolLM2-135M": 134_515_008}


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_load_offline_with_the_published_sizes(name, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert shipped_name(name) is not None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(load_model_config(name))
    assert sum(p.numel() for p in model.parameters()) == SHIPPED[name]


def test_an_unknown_model_is_a_one_line_error(monkeypatch):
    from oisd_lab.config import ConfigError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match=r"^model.name: no config for 'someone/unknown-7b' offline"):
        load_model_config("someone/unknown-7b")


@pytest.mark.slow
def test_settings_found_to_fit_do_fit_when_planned_again():
    from oisd_lab.plan.suggest import with_overrides

    cfg = compose(["method=oisd", "accelerator=cpu"])
    first = make_plan(cfg, 20)
    budget = first.peak * 0.75 / 2**30
    result = plan(cfg, budget, prompt_length=20, search=3)
    assert not result.fits(round(budget * 2**30)) and result.suggestions
    for item in result.suggestions:
        again = make_plan(with_overrides(cfg, dict(_parse(o) for o in item["overrides"])), 20)
        assert again.peak == item["peak_bytes"] <= budget * 2**30


def _parse(item: str):
    key, value = item.split("=")
    return key, True if value == "true" else (value if not value.isdigit() else int(value))


def test_cli_prints_the_plan(capsys):
    from oisd_lab.cli import main

    assert main(["plan", "model=tiny", "method=oisd", "accelerator=cpu", "--gpu-memory", "8"]) == 0
    out = capsys.readouterr().out
    assert "memory plan: tiny (6 layers" in out and "fits in 8.00 GiB" in out
    for row in ("KV cache", "think loss (lens JSD)", "attention loss", "gradients", "optimizer state"):
        assert row in out


def test_train_keeps_the_plan_beside_measured_peaks(tmp_path, cache_dir):
    from conftest import tiny_overrides

    from oisd_lab.train import train

    run = train(compose(tiny_overrides(tmp_path / "run", "log.plan=true", "method=oisd")), log=lambda *a: None)
    planned = json.loads((run / "plan.json").read_text())
    measured = json.loads((run / "memory.json").read_text())
    assert set(measured["phases"]) == {"rollout", "diagnostics", "policy step"}
    # planned for the run's own prompts: the task's first 64, as the run formats and tokenizes them
    cfg = compose(tiny_overrides(tmp_path / "run", "log.plan=true", "method=oisd"))
    source, tok = load_source(cfg.task), build_char_tokenizer()
    longest = max(len(tok(source.format_prompt(p.prompt, tok, cfg.model.chat_template))["input_ids"])
                  for p in source.train_batch(0, 64, cfg.seed))
    assert planned["setup"]["prompt_length"] == longest
    assert planned["setup"]["prompt_length_source"] == "longest of the run's first 64 training prompts"
    for phase, row in measured["phases"].items():
        assert row["planned_bytes"] == planned["phases"][phase]["total"] and row["measured_bytes"] > 0


def test_the_profiler_peak_is_an_allocation_and_prints_nothing_of_its_own(capfd):
    import sys

    from oisd_lab.synthetic import profiler_peak

    def fn():
        x = torch.ones(1000, 1000)  # 4,000,000 bytes held at once
        print("from fn", file=sys.stderr)
        return x.sum()

    assert 4_000_000 <= profiler_peak(fn) < 4_100_000
    err = capfd.readouterr().err
    assert "profiler_start" not in err and "profiler_stop" not in err and "from fn" in err


def test_rollout_formula_is_within_15_percent_of_a_measured_generate():
    from oisd_lab.bench.common import NoEos
    from oisd_lab.models import build_char_tokenizer, build_tiny_model
    from oisd_lab.rollout import generate
    from oisd_lab.synthetic import profiler_peak

    tok = build_char_tokenizer()
    model = build_tiny_model("tiny", len(tok))
    prompts, C, c = ["1+2*3=?" * 3] * 16, 64, model.config
    measured = profiler_peak(lambda: generate(model, NoEos(tok), prompts, 4, C))  # every row runs to C
    geometry = (c.num_hidden_layers, c.num_key_value_heads, c.hidden_size // c.num_attention_heads, 64,
                len(prompts[0]) + C, 4)
    planned = formulas.kv_cache_bytes(*geometry) + formulas.decode_step_bytes(*geometry, c.vocab_size)
    assert abs(planned / measured - 1) < 0.15, (planned, measured)


def test_planned_diagnostics_pass_matches_a_measured_one():
    from oisd_lab import diagnostics
    from oisd_lab.plan.model_config import load_model_config
    from oisd_lab.plan.setup import build_module, build_policy, micro_batches, step_shape
    from oisd_lab.synthetic import profiler_peak

    cfg = compose(["model=tiny6m", "method=oisd", "grpo.prompts_per_step=2", "grpo.max_completion_length=48",
                   "accelerator=cpu"])
    planned = make_plan(cfg, 20).phases["diagnostics"]
    module = build_module(cfg, build_policy(cfg, load_model_config("tiny6m")))
    (part, _), = micro_batches(step_shape(cfg, 20), module.policy.config.vocab_size, count=1)
    adv = part.advantages
    layers = list(range(module.num_layers + 1))

    def run():
        with torch.no_grad():
            diagnostics.layer_metrics(module.policy, module.readout, part, adv, (adv > 0).float(), layers,
                                      cfg.method.chunk_size)

    measured = profiler_peak(run)
    traced = sum(v for k, v in planned.items() if k.startswith("diagnostics: "))
    assert abs(traced / measured - 1) < 0.01, (traced, measured)


def test_plan_of_a_hub_model_needs_no_network_and_no_weights(monkeypatch):
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("the plan tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    cfg = compose(["model=Qwen/Qwen3-0.6B", "method=oisd", "grpo.prompts_per_step=1", "grpo.num_generations=2",
                   "grpo.max_completion_length=16", "accelerator=cpu"])
    result = make_plan(cfg, prompt_length=16)
    assert result.setup["parameters"] == SHIPPED["Qwen/Qwen3-0.6B"] and "extrapolated per layer to 28" in result.method
    assert result.state["parameters"] == 4 * SHIPPED["Qwen/Qwen3-0.6B"]


def test_fsdp_mixed_precision_computes_on_bf16_copies_of_fp32_masters():
    base = ["accelerator=gpu", "devices=8", "precision=bf16-mixed", "model.dtype=float32"]
    ddp = make_plan(compose([*base, "strategy=ddp"]), 20)
    fsdp = make_plan(compose([*base, "strategy=fsdp"]), 20)
    n = ddp.setup["parameters"]
    assert fsdp.setup["parameters"] == n and ddp.state["parameters"] == 4 * n
    assert fsdp.state["parameters"] == -(-4 * n // 8) and fsdp.state["optimizer state"] >= 8 * n // 8
    assert ddp.phases["policy step"]["gradients"] == 4 * n  # fp32 gradients of fp32 parameters
    # bf16 until reduce-scattered, one layer at a time, inside the backward only: this step peaks in
    # the second micro-batch's forward (its activations), which holds the fp32 shards alone
    assert fsdp.phases["policy step"]["gradients"] == fsdp.state["gradients"] < 2 * n
    assert fsdp.phases["rollout"]["FSDP gathered parameters"] == 2 * n


@pytest.mark.slow
def test_fsdp_gathers_the_whole_model_for_the_rollout_and_one_layer_at_a_time_for_the_step():
    """Per-layer FSDP2: the rollout holds every parameter gathered; the step the root (embedding,
    final norm, unembedding) and two decoder layers (the one computing and the one prefetched in
    backward), and their unsharded gradients; the diagnostics pass the root and one layer. Counts
    from the built model."""
    from oisd_lab.models import build_char_tokenizer, build_tiny_model

    model = build_tiny_model("tiny", vocab_size=len(build_char_tokenizer()), seed=0)
    layers = model.model.layers
    n = sum(p.numel() for p in model.parameters())
    layer = sum(p.numel() for p in layers[0].parameters())
    root = n - len(layers) * layer
    assert root == sum(p.numel() for name, p in model.named_parameters() if ".layers." not in name)
    base = ["accelerator=gpu", "devices=8", "precision=bf16-mixed", "model.dtype=float32", "strategy=fsdp"]
    plan = make_plan(compose([*base, "log.gradient_view=false"]), 20)
    assert plan.setup["parameters"] == n and plan.setup["layers"] == len(layers) == 6
    gathered = {k: v["FSDP gathered parameters"] for k, v in plan.phases.items()}
    assert gathered == {"rollout": 2 * n, "diagnostics": 2 * (root + layer), "policy step": 2 * (root + 2 * layer)}
    # a logging step's gradient view differentiates w.r.t. the whole gathered model
    viewed = make_plan(compose(base), 20)
    assert viewed.phases["policy step"]["FSDP gathered parameters"] == 2 * n
    # fp32 gradient shards; the bf16 gradients of the root and the two layers before reduce-scatter
    # count only at a peak inside the backward, and this step peaks in a forward
    assert plan.state["gradients"] == -(-4 * n // 8)
    assert plan.phases["policy step"]["gradients"] == -(-4 * n // 8)
    cache: dict = {}
    make_plan(compose([*base, "log.gradient_view=false"]), 20, cache=cache)
    (traced, _), = cache.values()
    assert "backward" not in traced.step.during and "policy forward (activations)" in traced.step.during


@pytest.mark.slow
def test_the_vllm_engine_is_in_every_phase_instead_of_our_decoding():
    from oisd_lab.models import build_char_tokenizer, build_tiny_model

    n = sum(p.numel() for p in build_tiny_model("tiny", vocab_size=len(build_char_tokenizer()), seed=0).parameters())
    hf = make_plan(compose(["accelerator=cpu"]), 20)
    cpu = make_plan(compose(["accelerator=cpu", "grpo.rollout_backend=vllm", "grpo.vllm_cpu_kv_cache_gib=0.5"]), 20)
    for phase, parts in cpu.phases.items():
        # CPU: the engine's own weights (fp32, as the policy) and the KV cache it is given
        assert parts["vLLM engine weights"] == 4 * n and parts["vLLM KV cache"] == 2**29
        assert "KV cache" not in parts and "decoding step" not in parts
        rest = {k: v for k, v in parts.items() if not k.startswith("vLLM") and k != "total"}
        want = {k: v for k, v in hf.phases[phase].items() if k not in ("KV cache", "decoding step", "total")}
        assert rest == want and parts["total"] == sum(rest.values()) + 4 * n + 2**29
    gpu = make_plan(compose(["accelerator=gpu", "grpo.rollout_backend=vllm", "grpo.vllm_gpu_memory_utilization=0.4"]),
                    20, device_memory=40 * 2**30)
    # GPU: the whole share vLLM reserves at start, in every phase
    assert {p["vLLM engine (its share of the GPU)"] for p in gpu.phases.values()} == {16 * 2**30}
    assert gpu.setup["rollout_backend"] == "vllm" and hf.setup["rollout_backend"] == "hf"


def test_lora_plans_gradients_and_optimizer_state_of_the_adapters_only():
    """With `model.lora_rank` the planned model is the adapted one (peft on the planner's fake
    tensors): the frozen base keeps its parameters, and gradients and AdamW's two moments exist for
    the adapters alone. Counts from a real adapted model."""
    from oisd_lab import lora
    from oisd_lab.models import build_char_tokenizer, build_tiny_model

    cfg = compose(["method=oisd", "model.lora_rank=8", "accelerator=cpu"])
    real = lora.attach(build_tiny_model("tiny", vocab_size=len(build_char_tokenizer()), seed=0), 8,
                       cfg.model.lora_alpha, 0.0, cfg.model.lora_targets)
    adapters = sum(p.numel() for p in real.parameters() if p.requires_grad)
    assert 0 < adapters == sum(p.numel() for n, p in real.named_parameters() if "lora_" in n)
    adapted = make_plan(cfg, 20)
    full = make_plan(compose(["method=oisd", "accelerator=cpu"]), 20)
    assert adapted.state["parameters"] == full.state["parameters"] + 4 * adapters
    assert adapted.state["gradients"] == 4 * adapters < full.state["gradients"] / 5
    assert 8 * adapters <= adapted.state["optimizer state"] < 8 * adapters + 4 * 1024  # + a step counter per tensor
