"""The `smollm2` bench section: it runs end to end at `--quick` sizes (on a tiny Llama checkpoint,
the same code path as SmolLM2) and writes every part; the floor arithmetic is checked by hand."""

from __future__ import annotations

import importlib.util
import json
from types import SimpleNamespace

import pytest

from oisd_lab.bench.smollm2 import floor_arithmetic
from oisd_lab.cli import main


def test_floor_arithmetic_of_smollm2_by_hand():
    cfg = SimpleNamespace(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, vocab_size=49152,
                          num_attention_heads=9, num_key_value_heads=3)
    f = floor_arithmetic(cfg, prompt_len=0, completion_len=64)
    # q, o: 576^2 each; k, v: 576 x 192 each; MLP: 3 x 576 x 1536
    assert f["layer_macs"] == 2 * 331_776 + 2 * 110_592 + 2_654_208 == 3_538_944
    assert f["head_macs"] == 28_311_552
    assert f["per_token_macs"] == 30 * 3_538_944 + 28_311_552  # about 134M
    assert f["floor_per_token"] == pytest.approx(1 + 28_311_552 / 134_479_872)
    # with no prompt every position is a completion position: the same ratio
    assert f["floor_this_batch"] == pytest.approx(f["floor_per_token"])
    longer = floor_arithmetic(cfg, prompt_len=40, completion_len=64)
    assert 1.0 < longer["floor_this_batch"] < f["floor_per_token"]  # prompt positions have no head
    assert longer["floor_this_batch_shared_prompt"] == longer["floor_this_batch"]  # groups of one row
    # the smollm2 bench batch: a 49-token prompt run once per group of 4 rows, 64 completion tokens
    shared = floor_arithmetic(cfg, prompt_len=49, completion_len=64, generations=4)
    seq = (49 / 4 + 64) * 30 * 3_538_944 + 64 * 28_311_552
    assert shared["floor_this_batch_shared_prompt"] == pytest.approx((seq + 64 * 28_311_552) / seq)
    assert shared["floor_this_batch_shared_prompt"] == pytest.approx(1.183, abs=5e-4)  # the figure reported
    assert shared["floor_this_batch"] == pytest.approx(1.131, abs=5e-4)


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="needs the bench extra (trl)")
def test_bench_quick_smollm2_section_on_a_tiny_llama(tmp_path, char_tokenizer):
    from oisd_lab.models import build_tiny_model

    model_dir = tmp_path / "model"
    build_tiny_model("tiny_llama", vocab_size=len(char_tokenizer), seed=0).save_pretrained(model_dir)
    char_tokenizer.save_pretrained(model_dir)
    out = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--sections", "smollm2", "--smol-model", str(model_dir),
                 "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    smol = result["smollm2"]
    assert set(smol["presets"]["per_preset"]) == {"grpo", "oisd_logit", "oisd_attn", "oisd", "oisd_unsigned"}
    for c in ("cpu", "wall"):
        for v in smol["presets"]["per_preset"].values():
            assert v[c]["forward_backward_s"]["median"] > 0 and v[c]["ratio_fb_vs_grpo"]["median"] > 0
        assert smol["presets"]["decode_s"]["hf"][c]["median"] > 0
        assert smol["diagnostics"][c]["diagnostics_per_log_step_s"] > 0
        assert 0 < smol["diagnostics"][c]["amortised_share_of_step"]
        assert smol["trl"][c]["ratio_ours_vs_trl"]["median"] > 0
        assert smol["trl"][c]["ratio_whole_rows_vs_trl"]["median"] > 0
        assert smol["trl"][c]["ratio_ours_vs_whole_rows"]["median"] > 0
    assert smol["presets"]["per_preset"]["grpo"]["cpu"]["ratio_fb_vs_grpo"]["median"] == 1.0
    assert {"grpo", "oisd_logit", "oisd"} == set(smol["memory"]["per_preset"])
    assert all(v["peak_bytes"] > 0 for v in smol["memory"]["per_preset"].values())
    names = {t["target"] for t in result["targets"]}
    assert "smollm2 grpo step / TRL GRPOTrainer step" in names
    assert "smollm2 diagnostics amortised / step" in names
