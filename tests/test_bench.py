"""`oisd-lab bench --quick`: the command runs and writes every section with positive numbers (no
timing thresholds), and the optimisations it measures leave the results unchanged."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from oisd_lab import losses
from oisd_lab.cli import main
from oisd_lab.rollout import generate

CLOCKS = ("cpu", "wall")


def _positive(st: dict) -> bool:
    return st["n"] >= 1 and st["median"] is not None and st["median"] > 0


def test_bench_quick_writes_every_section(tmp_path):
    out = tmp_path / "bench.json"
    code = main(["bench", "--quick", "--sections", "presets,memory,attn512", "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert {"meta", "presets", "memory", "attn512", "targets"} <= result.keys()
    assert result["meta"]["nproc"] >= 1 and result["meta"]["torch_threads"] >= 1
    presets = result["presets"]["per_preset"]
    assert set(presets) == {"grpo", "oisd_logit", "oisd_attn", "oisd", "oisd_unsigned"}
    for per in presets.values():
        for c in CLOCKS:
            for key in ("opt_step_s", "full_step_s", "ratio_opt_vs_grpo", "ratio_full_vs_grpo",
                        "rollout_tokens_per_s"):
                assert _positive(per[c][key]), (c, key)
            assert set(per[c]["breakdown_s"]) == {"rollout", "scoring", "forward_backward", "alignment",
                                                  "logging", "step"}
            assert _positive(per[c]["breakdown_s"]["rollout"]) and _positive(per[c]["breakdown_s"]["step"])
    assert presets["grpo"]["cpu"]["ratio_opt_vs_grpo"]["median"] == 1.0
    memory = result["memory"]["per_preset"]
    assert {"grpo", "oisd_logit", "oisd"} <= memory.keys()
    assert all(v["peak_bytes"] > 0 and v["ratio_vs_grpo"] > 0 for v in memory.values())
    attn = result["attn512"]["per_preset"]
    assert _positive(attn["oisd_attn"]["cpu"]["ratio_full_vs_grpo"])
    assert _positive(result["attn512"]["generate_s"]["wall"])
    assert {t["clock"] for t in result["targets"]} == {"cpu", "wall", "memory"}
    assert all(t["value"] > 0 and isinstance(t["met"], bool) for t in result["targets"])


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="needs the bench extra (trl)")
def test_bench_quick_trl_comparison(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--sections", "trl", "--out", str(out)]) == 0
    trl = json.loads(out.read_text())["trl"]
    for c in CLOCKS:
        for key in ("ours_step_s", "trl_step_s", "ratio_ours_vs_trl", "trl_generate_s"):
            assert _positive(trl[c][key]), (c, key)
    assert _positive(trl["trl_mean_completion_length"])


def test_bench_rejects_unknown_sections(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--sections", "nope"])


# ---------------------------------------------------------------- the optimisations change nothing


def _hf_generate(model, tok, prompts, new_tokens):
    from transformers import GenerationConfig

    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    cfg = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                           eos_token_id=tok.eos_token_id)
    out = model.generate(**enc, generation_config=cfg)
    return out[:, enc["input_ids"].shape[1]:]


def test_decoding_loop_matches_model_generate_greedy(tiny_model, char_tokenizer):
    prompts = ["Q: 1+2\nA: ", "Q: (3+4)*5\nA: ", "Q: 7\nA: "]  # unequal lengths: left padding
    ours = generate(tiny_model, char_tokenizer, prompts, 2, 12, do_sample=False)
    ref = _hf_generate(tiny_model, char_tokenizer, prompts, 12).repeat_interleave(2, dim=0)
    ref_mask = ours.completion_mask.bool()
    assert torch.equal(ours.completion_ids[ref_mask], ref[:, : ours.completion_ids.shape[1]][ref_mask])


def test_decoding_loop_matches_model_generate_sampling(tiny_model, char_tokenizer):
    # one row: the same random draws in the same order as transformers' sampler
    torch.manual_seed(3)
    ours = generate(tiny_model, char_tokenizer, ["Q: 2+2\nA: "], 1, 16, temperature=0.7)
    torch.manual_seed(3)
    from transformers import GenerationConfig

    enc = char_tokenizer(["Q: 2+2\nA: "], return_tensors="pt", add_special_tokens=False)
    cfg = GenerationConfig(max_new_tokens=16, do_sample=True, temperature=0.7, top_k=0, top_p=1.0,
                           pad_token_id=0, eos_token_id=char_tokenizer.eos_token_id)
    ref = tiny_model.generate(**enc, generation_config=cfg)[:, enc["input_ids"].shape[1]:]
    n = int(ours.completion_mask.sum())
    assert torch.equal(ours.completion_ids[0, :n], ref[0, :n])


def test_top_p_keeps_the_smallest_set_above_p():
    from oisd_lab.rollout import _next_tokens

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    torch.manual_seed(0)
    draws = torch.stack([_next_tokens(logits, 1.0, 0.7, True) for _ in range(400)])
    assert set(draws.flatten().tolist()) == {0, 1}
    assert _next_tokens(logits, 1.0, 1.0, False).item() == 0


def test_lens_jsd_with_teacher_index_matches_the_copied_teacher():
    torch.manual_seed(0)
    weight = torch.randn(7, 4, requires_grad=True)
    hidden = torch.randn(3, 5, 4)
    logits = torch.randn(3, 5, 7)
    sel = torch.rand(3, 5) > 0.4
    grads = []
    for use_index in (False, True):
        weight.grad = None
        h = hidden[sel]
        if use_index:
            div = losses.chunked_lens_jsd(h, logits, lambda x: x @ weight.T, chunk_size=2,
                                          teacher_index=sel.nonzero(as_tuple=True))
        else:
            div = losses.chunked_lens_jsd(h, logits[sel], lambda x: x @ weight.T, chunk_size=2)
        div.sum().backward()
        grads.append((div.detach(), weight.grad.clone()))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])


def test_entropy_temperature_matches_divided_logits():
    logits = torch.randn(4, 6, 11)
    torch.testing.assert_close(losses.entropy_from_logits(logits, chunk_size=5, temperature=0.6),
                               losses.entropy_from_logits(logits / 0.6))


def test_loss_terms_read_the_positions_that_predict_the_completion(tiny_model, char_tokenizer):
    from oisd_lab.config import compose
    from oisd_lab.module import OISDModule
    from oisd_lab.sampler import Sampler
    from oisd_lab.sources import load_source

    cfg = compose(["method=oisd_logit", "grpo.temperature=0.8"])
    source = load_source(cfg.task)
    module = OISDModule(cfg, tiny_model, char_tokenizer, Sampler(cfg, tiny_model, char_tokenizer, source, source.reward))
    torch.manual_seed(0)
    rollout = generate(tiny_model, char_tokenizer, ["Q: 1+2\nA: ", "Q: (3+4)*5\nA: "], 3, 10)
    part = rollout.select(slice(0, len(rollout)))
    adv = torch.linspace(-1.0, 1.0, len(part))
    mask = part.completion_mask
    terms = module.loss_terms(part.scored(adv), dict(num_items_in_batch=mask.sum(), num_sequences=len(part),
                                                      max_completion_length=10))
    with torch.no_grad():
        full = tiny_model(input_ids=part.input_ids, attention_mask=part.attention_mask).logits
        P, C = part.prompt_length, mask.shape[1]
        logp = torch.log_softmax(full[:, P - 1 : P - 1 + C] / 0.8, -1)
        ent = -(logp.exp() * logp).sum(-1)
    torch.testing.assert_close(terms["sum/entropy"], (ent * mask).sum(), rtol=1e-5, atol=1e-4)
    # rho == 1 in value: the dapo policy loss is -sum(A * M) / sum(M)
    torch.testing.assert_close(terms["loss/policy"], -(adv[:, None] * mask).sum() / mask.sum())
    assert float(terms["loss/think"].detach()) != 0.0


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_token_logps_value_and_gradient_match_log_softmax(dtype):
    torch.manual_seed(0)
    logits = (3 * torch.randn(3, 5, 17, dtype=torch.float64)).to(dtype).requires_grad_(True)
    tokens = torch.randint(0, 17, (3, 5))
    weights = torch.randn(3, 5, dtype=torch.float64)
    got = losses.token_logps(logits, tokens, temperature=0.7, chunk_size=4)
    (got.double() * weights).sum().backward()
    grad = logits.grad.clone()
    logits.grad = None
    ref = torch.log_softmax(logits.double() / 0.7, -1).gather(-1, tokens[..., None]).squeeze(-1)
    (ref * weights).sum().backward()
    tol = dict(rtol=1e-6, atol=1e-9) if dtype == torch.float64 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got.double(), ref.detach(), **tol)
    torch.testing.assert_close(grad.double(), logits.grad.double(), **tol)
    assert torch.autograd.gradcheck(
        lambda x: losses.token_logps(x, tokens, temperature=0.7, chunk_size=4),
        (torch.randn(3, 5, 17, dtype=torch.float64, requires_grad=True),))


@pytest.mark.parametrize("heads, sink", [("mean", False), ("per_head", True)])
def test_attention_row_blocks_are_exact(tiny_model, char_tokenizer, monkeypatch, heads, sink):
    from oisd_lab import module as module_lib
    from oisd_lab import step as step_lib
    from oisd_lab.config import compose
    from oisd_lab.sampler import Sampler
    from oisd_lab.sources import load_source

    cfg = compose(["method=oisd_attn", f"method.attn_heads={heads}", f"method.attn_exclude_sink={sink}",
                   "method.layers=[1,3]"])
    source = load_source(cfg.task)
    module = module_lib.OISDModule(cfg, tiny_model, char_tokenizer,
                                   Sampler(cfg, tiny_model, char_tokenizer, source, source.reward))
    torch.manual_seed(1)
    rollout = generate(tiny_model, char_tokenizer, ["Q: 1+2\nA: ", "Q: (3+4)*5\nA: "], 2, 12)
    part = rollout.select(slice(0, len(rollout)))
    adv = torch.tensor([1.0, -0.5, 0.25, -2.0])
    norm = dict(num_items_in_batch=part.completion_mask.sum(), num_sequences=4, max_completion_length=12)
    results = []
    for block in (1000, 3):
        monkeypatch.setattr(step_lib, "ATTN_ROW_BLOCK", block)
        tiny_model.zero_grad(set_to_none=True)
        loss = module.loss_terms(part.scored(adv), norm)["loss/attn"]
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in tiny_model.named_parameters()
                                        if p.grad is not None}))
    torch.testing.assert_close(results[0][0], results[1][0])
    assert results[0][1].keys() == results[1][1].keys() and results[0][1]
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-4, atol=1e-8, msg=name)


@pytest.mark.parametrize("shaping", [dict(top_k=2), dict(min_p=0.3), dict(repetition_penalty=1.3),
                                     dict(top_k=8, min_p=0.05, repetition_penalty=1.2)])
def test_sampling_shapers_match_model_generate(tiny_model, char_tokenizer, shaping):
    """top-k, min-p and the repetition penalty: one row draws the same tokens as transformers'
    sampler with the same seed and settings."""
    from transformers import GenerationConfig

    torch.manual_seed(5)
    ours = generate(tiny_model, char_tokenizer, ["Q: 12+9\nA: "], 1, 20, temperature=0.5, **shaping)
    torch.manual_seed(5)
    enc = char_tokenizer(["Q: 12+9\nA: "], return_tensors="pt", add_special_tokens=False)
    cfg = GenerationConfig(max_new_tokens=20, do_sample=True, temperature=0.5, top_p=1.0, pad_token_id=0,
                           eos_token_id=char_tokenizer.eos_token_id,
                           **{"top_k": 0, **shaping})
    ref = tiny_model.generate(**enc, generation_config=cfg)[:, enc["input_ids"].shape[1]:]
    n = int(ours.completion_mask.sum())
    assert n > 3 and torch.equal(ours.completion_ids[0, :n], ref[0, :n])
