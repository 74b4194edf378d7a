"""Per-layer diagnostics with bounded memory: the same values as the plain implementation (kept
below as the reference: full hidden states, eager attention probabilities, full logits), and a
peak that stays within `diagnostics.peak_bound` and does not grow with the model's depth."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3Config

from oisd_lab import diagnostics, losses
from oisd_lab.anatomy import backbone_of
from oisd_lab.attention import AttentionCapture, attention_layer_of, hidden_index_of
from oisd_lab.hidden_capture import HiddenCapture
from oisd_lab.lens import find_readout
from oisd_lab.rollout import Rollout, generate
from oisd_lab.step import policy_forward
from oisd_lab.synthetic import profiler_peak


# ---------------------------------------------------------------- the plain implementation
def _ref_lens_token_metrics(readout, hidden, layer, final_logits, tokens, chunk):
    out = defaultdict(list)
    for lo in range(0, hidden.shape[0], chunk):
        h, t, tok = hidden[lo : lo + chunk], final_logits[lo : lo + chunk], tokens[lo : lo + chunk]
        lens = readout.logits(h, layer).float()
        out["lens_acc"].append((lens.argmax(-1) == tok).float())
        out["agree_top1"].append((lens.argmax(-1) == t.argmax(-1)).float())
        out["kl"].append(losses.kl_from_logits(t, lens))
        out["jsd"].append(losses.jsd(t, lens))
        out["entropy"].append(losses.entropy_from_logits(lens))
    return {k: torch.cat(v) for k, v in out.items()}


@torch.no_grad()
def reference_layer_metrics(model, readout, part, adv, rewards, layers, chunk=1024):
    L, mask = readout.num_layers, part.completion_mask
    attn = sorted({k for k in layers if k >= 1} | {L})
    out = policy_forward(model, part, hidden_layers=layers, attn_layers=attn)
    probs = {k: out.attention_rows(k).float() for k in attn}
    sel = mask.bool()
    rows_of_tok = torch.arange(mask.shape[0])[:, None].expand_as(mask)[sel]
    final, tokens, keys = out.logits[sel].float(), part.completion_ids[sel], part.attention_mask.bool()
    rows = []
    for k in layers:
        per_tok = _ref_lens_token_metrics(readout, out.hidden[k][sel], k, final, tokens, chunk)
        heads = []
        if k >= 1:
            teacher, student = probs[L], probs[k]
            per_tok["attn_jsd"] = losses.attention_row_jsd(teacher, student, sel, keys)[sel]
            per_tok["attn_cos"] = losses.attention_cosine(teacher, student, sel, keys)[sel]
            heads = [losses.attention_row_jsd(teacher[:, i : i + 1], student[:, i : i + 1], sel, keys)[sel]
                     for i in range(teacher.shape[1])]
        # the splits as documented: every rollout, the advantage's sign (0 in neither), correct or not
        splits = {"all": torch.ones_like(adv, dtype=torch.bool), "pos": adv > 0, "neg": adv < 0,
                  "correct": rewards > 0.5, "wrong": rewards <= 0.5}
        for split, row_sel in splits.items():
            tok_sel = row_sel[rows_of_tok]
            row = {"layer": k, "split": split, "tokens": int(tok_sel.sum())}
            row.update({name: float(v[tok_sel].sum()) for name, v in per_tok.items()})
            if split == "all":
                row["attn_jsd_head"] = [float(v[tok_sel].sum()) for v in heads]
            rows.append(row)
    return rows


@torch.no_grad()
def reference_snapshot(model, readout, part, rows, student_layers):
    L, P, mask = readout.num_layers, part.prompt_length, part.completion_mask
    attn_layers = sorted({attention_layer_of(k) for k in student_layers} | {attention_layer_of(L)})
    with AttentionCapture(model, attn_layers) as cap:
        out = model(input_ids=part.input_ids[rows], attention_mask=part.attention_mask[rows],
                    output_hidden_states=True, use_cache=False)
        maps = {i: cap.probs[i].float().mean(1) for i in attn_layers}
    result = []
    for j, row in enumerate(rows):
        n, start = int(mask[row].sum()), int((part.attention_mask[row] == 0).sum())
        tops = [readout.logits(out.hidden_states[k][j, P - 1 : P - 1 + n], k).float().softmax(-1).max(-1)
                for k in range(L + 1)]
        result.append({"top_token": [t.indices.tolist() for t in tops], "top_prob": [t.values.tolist() for t in tops],
                       "attention": {f"L{hidden_index_of(i)}": maps[i][j, P - 1 : P - 1 + n, start : P + n].tolist()
                                     for i in attn_layers}})
    return result


# ---------------------------------------------------------------- fixtures
def _rollout(model, tokenizer):
    torch.manual_seed(3)
    prompts = ["Q: 1+2\nA: ", "Q: 10*3-4\nA: ", "Q: 7\nA: "]
    out = generate(model, tokenizer, prompts, 3, max_new_tokens=14, temperature=1.5)
    P, C = out.prompt_length, out.completion_mask.shape[1]
    for i in range(len(out)):  # a random model rarely stops: end some completions by hand
        n = C - 3 * (i % 4)
        out.completion_mask[i, n:] = 0
        out.attention_mask[i, P + n :] = 0
        out.input_ids[i, P + n :] = tokenizer.pad_token_id
    return out


def _adv_rewards(n):
    adv = torch.linspace(-1.0, 1.0, n)
    adv[n // 2] = 0.0
    return adv, (adv > 0.2).float()


def _close(a, b):
    return abs(a - b) <= 1e-6 + 1e-5 * abs(b)


@pytest.mark.parametrize("preset", ["tiny", "tiny_llama"])
def test_layer_metrics_equal_the_plain_implementation(preset, char_tokenizer):
    from oisd_lab.models import build_tiny_model

    model = build_tiny_model(preset, vocab_size=len(char_tokenizer), seed=0).eval()
    readout = find_readout(model)
    part = _rollout(model, char_tokenizer)
    assert part.completion_mask.sum(1).min() < part.completion_mask.shape[1]  # some padding
    adv, rewards = _adv_rewards(len(part))
    L = readout.num_layers
    for layers in (list(range(L + 1)), [0], [3, L]):
        got = diagnostics.layer_metrics(model, readout, part, adv, rewards, layers, chunk=7)
        want = reference_layer_metrics(model, readout, part, adv, rewards, layers)
        _assert_rows_equal(got, want)
        assert all(w["tokens"] > 0 for w in want if w["split"] == "all")
    full = diagnostics.layer_metrics(model, readout, part, adv, rewards, list(range(L + 1)))
    assert any(r["attn_jsd"] > 1e-3 for r in full if r["layer"] not in (0, L) and r["split"] == "all")


def _assert_rows_equal(got, want):
    assert [(r["layer"], r["split"], sorted(r)) for r in got] == [(r["layer"], r["split"], sorted(r)) for r in want]
    for g, w in zip(got, want, strict=True):
        assert g["tokens"] == w["tokens"]
        for name in diagnostics.METRICS:
            if name in w:
                assert _close(g[name], w[name]), (g["layer"], g["split"], name, g[name], w[name])
        assert len(g.get("attn_jsd_head", [])) == len(w.get("attn_jsd_head", []))
        assert all(_close(a, b) for a, b in zip(g.get("attn_jsd_head", []), w.get("attn_jsd_head", []), strict=True))


def test_layer_metrics_of_long_completions_equal_the_plain_implementation(tiny_model, char_tokenizer):
    """More completion positions than one attention row block (64): the blocks' per-token values,
    the per-head ones included, are put together in row order."""
    tiny_model.eval()
    readout = find_readout(tiny_model)
    torch.manual_seed(4)
    part = generate(tiny_model, char_tokenizer, ["Q: 1+2\nA: ", "Q: 7\nA: "], 2, max_new_tokens=80,
                    temperature=1.5)
    part.completion_mask[1, 70:] = 0  # one completion ends in the second block
    part.attention_mask[1, part.prompt_length + 70:] = 0
    assert part.completion_mask.shape[1] > 64
    adv, rewards = _adv_rewards(len(part))
    layers = [1, 3, readout.num_layers]
    got = diagnostics.layer_metrics(tiny_model, readout, part, adv, rewards, layers, chunk=7)
    _assert_rows_equal(got, reference_layer_metrics(tiny_model, readout, part, adv, rewards, layers))


def test_snapshot_equals_the_plain_implementation(tiny_model, char_tokenizer):
    tiny_model.eval()
    readout = find_readout(tiny_model)
    part = _rollout(tiny_model, char_tokenizer)
    rows, students = [0, 4, 7], [2]
    got = diagnostics.snapshot(tiny_model, readout, part, rows, students, char_tokenizer, chunk=5)
    _assert_snapshots_equal(got, reference_snapshot(tiny_model, readout, part, rows, students), char_tokenizer)


def _assert_snapshots_equal(got, want, tokenizer):
    for g, w in zip(got, want, strict=True):
        assert g["top_token"] == [tokenizer.convert_ids_to_tokens(t) for t in w["top_token"]]
        assert torch.allclose(torch.tensor(sum(g["top_prob"], [])), torch.tensor(sum(w["top_prob"], [])), atol=1e-6)
        assert g["attention"].keys() == w["attention"].keys()
        for key, value in w["attention"].items():
            assert torch.allclose(torch.tensor(g["attention"][key]), torch.tensor(value), atol=1e-6)


def test_snapshot_of_long_completions_equals_the_plain_implementation(tiny_model, char_tokenizer):
    """More completion positions than one attention row block (64) and more lens rows than the
    hidden width: the blocks and the chunks are put together in order."""
    tiny_model.eval()
    readout = find_readout(tiny_model)
    torch.manual_seed(4)
    part = generate(tiny_model, char_tokenizer, ["Q: 1+2\nA: ", "Q: 7\nA: "], 1, max_new_tokens=80,
                    temperature=1.5)
    assert part.completion_mask.shape[1] > 64 and 2 * part.completion_mask.shape[1] > tiny_model.config.hidden_size
    got = diagnostics.snapshot(tiny_model, readout, part, [0, 1], [2], char_tokenizer, chunk=7)
    _assert_snapshots_equal(got, reference_snapshot(tiny_model, readout, part, [0, 1], [2]), char_tokenizer)


@pytest.mark.parametrize("preset", ["tiny", "tiny_llama"])
def test_hidden_capture_equals_output_hidden_states(preset, char_tokenizer):
    from oisd_lab.models import build_tiny_model

    model = build_tiny_model(preset, vocab_size=len(char_tokenizer), seed=1).eval()
    readout = find_readout(model)
    ids = torch.randint(3, len(char_tokenizer), (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        with HiddenCapture(model, readout, range(readout.num_layers + 1), slice(2, 8)) as cap:
            backbone_of(model)(input_ids=ids, attention_mask=mask, use_cache=False)
    assert sorted(cap.hidden) == list(range(readout.num_layers + 1))
    for k, h in cap.hidden.items():
        assert torch.equal(h, full[k][:, 2:8]), k


def test_diagnosed_layers_and_rows():
    assert diagnostics.diagnosed_layers(6) == list(range(7))
    assert diagnostics.diagnosed_layers(30) == list(range(31))  # SmolLM2: every layer
    limit = diagnostics.ALL_LAYERS_UP_TO
    assert diagnostics.diagnosed_layers(limit) == list(range(limit + 1))
    assert len(diagnostics.diagnosed_layers(limit + 1)) < limit + 2
    deep = diagnostics.diagnosed_layers(36, None, [6])
    assert deep[0] == 0 and deep[-1] == 36 and 6 in deep and len(deep) <= 14
    assert diagnostics.diagnosed_layers(36, [3, 1, 3]) == [1, 3]
    assert diagnostics.diag_rows(2300, 8) == 3 and diagnostics.diag_rows(40, 64) == 64
    assert diagnostics.diag_rows(20_000, 8) == 1


# ---------------------------------------------------------------- memory
V, C, P, ROWS = 8192, 256, 16, 4


def _qwen3(layers: int):
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=P + C + 1,
                      tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()


def _long_rollout():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, V, (ROWS, P + C), generator=gen)
    cmask = torch.ones(ROWS, C)
    cmask[1, C // 2 :] = 0
    return Rollout(input_ids=ids, attention_mask=torch.cat([torch.ones(ROWS, P), cmask], 1).long(),
                   completion_mask=cmask, prompt_length=P, texts=[""] * ROWS, truncated=torch.ones(ROWS, dtype=torch.bool))


def _bound(layers: list[int], L: int, forward: int, chunk: int) -> int:
    return diagnostics.peak_bound(ROWS, P + C, C, 64, 4, 2, 16, V, n_hidden=len({*layers, L}),
                                  n_attn=len({k for k in layers if k >= 1} | {L}), dtype_bytes=4, chunk=chunk,
                                  forward_bytes=forward)


def _peaks(depth: int, chunk: int = 256, plain: bool = True) -> dict:
    """Peaks of one logging pass at this depth: the diagnostics on a fixed set of layers and on
    the default set, and (`plain`) the plain implementation on every layer, as logging steps ran it."""
    model, part = _qwen3(depth), _long_rollout()
    readout, L = find_readout(model), depth
    fixed, default = [0, 1, 2, L], diagnostics.diagnosed_layers(L, None, [max(1, L // 6)])
    adv, rewards = _adv_rewards(ROWS)
    forward = profiler_peak(lambda: _no_grad_forward(model, part))
    out = {"forward": forward, "default_layers": len(default)}
    for name, layers in (("fixed", fixed), ("default", default)):
        out[name] = profiler_peak(lambda layers=layers: diagnostics.layer_metrics(
            model, readout, part, adv, rewards, layers, chunk))
        out[f"{name}_bound"] = _bound(layers, L, forward, chunk)
    if plain:
        every = list(range(L + 1))
        out["plain"] = profiler_peak(lambda: reference_layer_metrics(model, readout, part, adv, rewards, every, chunk))
    return out


@torch.no_grad()
def _no_grad_forward(model, part):
    backbone_of(model)(input_ids=part.input_ids, attention_mask=part.attention_mask, use_cache=False)


@pytest.fixture(scope="module")
def peaks():
    """Depths 4 and 24 (every layer diagnosed by default) and 40 (the default subset)."""
    return {4: _peaks(4), 24: _peaks(24), 40: _peaks(40, plain=False)}


@pytest.mark.slow
def test_diagnostics_peak_within_the_stated_bound(peaks):
    for depth, p in peaks.items():
        assert p["fixed"] <= p["fixed_bound"] and p["default"] <= p["default_bound"], (depth, p)
    assert peaks[24]["default_layers"] == 25 and 12 <= peaks[40]["default_layers"] <= 14


@pytest.mark.slow
def test_diagnostics_peak_does_not_grow_with_depth(peaks):
    """6x and 10x the layers, the same diagnosed layers: the same peak; beyond 32 layers the default
    set stays small. The plain implementation, run on every layer as logging steps did, grows by
    at least one [b, H, T, T] float32 attention tensor per layer."""
    shallow, deep = peaks[4], peaks[24]
    assert peaks[40]["fixed"] <= 1.05 * shallow["fixed"] and deep["fixed"] <= 1.05 * shallow["fixed"], peaks
    assert peaks[40]["default"] < deep["default"] < deep["plain"] / 2, peaks
    assert deep["plain"] - shallow["plain"] >= 20 * ROWS * 4 * (P + C) ** 2 * 4, (shallow, deep)
