"""LoRA through peft (`model.lora_rank`): a training run changes only adapter parameters, the
saved adapters reload with peft and give the trained policy's outputs, and the merged model equals
the base weights plus (alpha / rank) B A, with the same outputs."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_alignment_in_view, assert_gradients_flowed, tiny_overrides
from safetensors.torch import load_file

from oisd_lab import pretrain
from oisd_lab.cli import main
from oisd_lab.config import ConfigError, compose
from oisd_lab.models import load_pretrained


@pytest.mark.slow
def test_a_lora_run_trains_adapters_only_and_saves_them_merged_and_alone(tmp_path, cache_dir):
    from peft import PeftModel

    run_dir = tmp_path / "run"
    overrides = tiny_overrides(run_dir, "log.wandb_mode=disabled", "max_steps=3", "method=oisd", "grpo.lr=1e-3",
                               "model.lora_rank=4", "model.lora_alpha=8")
    assert main(["train", *overrides]) == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert_gradients_flowed(rows)
    assert_alignment_in_view(rows)

    cfg = compose(overrides)
    base, tok = load_pretrained(pretrain.warm_start(cfg, log=lambda line: None))
    start = {k: v.clone() for k, v in base.state_dict().items()}
    final = run_dir / "final_model"
    merged = load_file(final / "model.safetensors")
    adapters = load_file(final / "adapter" / "adapter_model.safetensors")
    assert adapters and all("lora_" in k for k in adapters)
    # merged = base + (alpha / r) B A on every adapted projection, the base elsewhere
    scale = 8 / 4
    changed = 0
    for name, weight in start.items():
        module = name.removesuffix(".weight")
        a_key = next((k for k in adapters if k.endswith(f"{module}.lora_A.weight")), None)
        if a_key is None:
            if name in merged:
                assert torch.equal(merged[name], weight), name  # not adapted: untouched
            continue
        delta = scale * adapters[a_key.replace("lora_A", "lora_B")] @ adapters[a_key]
        torch.testing.assert_close(merged[name], weight + delta, rtol=1e-5, atol=1e-6)
        changed += int(delta.abs().max() > 0)
    assert changed > 0  # the adapters moved
    # the adapters reload with peft onto the base and match the merged model's outputs
    reloaded = PeftModel.from_pretrained(base, final / "adapter").eval()
    plain, _ = load_pretrained(final)
    ids = torch.tensor([tok("Q: 12+7\nA: ")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, plain.eval()(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-5)


def test_lora_is_refused_under_fsdp_and_a_negative_rank_is_an_error():
    with pytest.raises(ConfigError, match="model.lora_rank"):
        compose(["model.lora_rank=4", "strategy=fsdp"])
    with pytest.raises(ConfigError, match="model.lora_rank"):
        compose(["model.lora_rank=-1"])
