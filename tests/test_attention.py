"""Attention capture: probabilities equal eager's, logits equal sdpa's, gradients flow."""

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    DynamicCache,
    Gemma3TextConfig,
    LlamaConfig,
    Qwen2Config,
    Qwen3Config,
)

from oisd_lab.attention import (
    AttentionCapture,
    attention_capture_supported,
    attention_layer_of,
    attention_modules,
    attention_probs,
    hidden_index_of,
)

TINY = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,  # grouped-query attention
    head_dim=8,
    initializer_range=0.2,  # peaked attention rows, so comparisons mean something
)

CONFIGS = {
    "qwen2": lambda: Qwen2Config(**TINY),
    "llama": lambda: LlamaConfig(**TINY),
    "qwen3": lambda: Qwen3Config(**TINY),
    # Window 4 < sequence 8: the sliding layers get a materialised window mask.
    "gemma3": lambda: Gemma3TextConfig(
        **TINY,
        sliding_window=4,
        query_pre_attn_scalar=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    ),
}


def build(name: str, attn: str = "sdpa"):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(CONFIGS[name](), attn_implementation=attn).eval()


def twin(model, attn: str = "eager"):
    """The same weights under another attention implementation (on a copy of the config:
    `from_config` sets the implementation on the config it is given, which would switch `model`)."""
    other = AutoModelForCausalLM.from_config(copy.deepcopy(model.config), attn_implementation=attn).eval()
    other.load_state_dict(model.state_dict())
    return other


def real_rows(probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, H, T, S] -> [N, H, S]: the query rows of real (non-padded) tokens only."""
    return probs.transpose(1, 2)[mask.bool()]


def left_padded_batch():
    ids = torch.randint(1, 97, (3, 8), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    mask[2, :1] = 0
    return ids, mask


@pytest.mark.parametrize("name", list(CONFIGS))
def test_probs_equal_eager_and_logits_equal_sdpa(name):
    model = build(name)
    eager = twin(model)
    ids, mask = left_padded_batch()
    with torch.no_grad():
        plain = model(ids, attention_mask=mask).logits
        ref = eager(ids, attention_mask=mask, output_attentions=True)
    with AttentionCapture(model, layers=[0, 1, 2]) as cap:
        out = model(ids, attention_mask=mask)
    assert torch.equal(out.logits, plain)  # the layers themselves still run sdpa
    for layer in range(3):
        probs = cap.probs[layer]
        assert probs.shape == (3, 4, 8, 8) and probs.requires_grad
        # Padded query rows are uniform in both; only real rows carry meaning.
        torch.testing.assert_close(
            real_rows(probs, mask), real_rows(ref.attentions[layer], mask), atol=1e-6, rtol=0
        )
        assert probs[1, :, 3:, :3].abs().max() == 0  # padded keys get no mass
        torch.testing.assert_close(cap.probs_for(layer, slice(5, 8)), probs[:, :, 5:8])


def test_only_requested_layers_are_touched():
    model = build("qwen3")
    ids, mask = left_padded_batch()
    modules = attention_modules(model)
    with AttentionCapture(model, layers=[1]) as cap:
        assert modules[1].config is not model.config
        assert modules[0].config is model.config and modules[2].config is model.config
        model(ids, attention_mask=mask)
    assert set(cap.probs) == {1} and 0 not in cap.probs and len(cap.probs) == 1
    assert all(m.config is model.config for m in modules.values())
    assert model.config._attn_implementation == "sdpa"
    before = cap.probs[1]
    model(ids, attention_mask=mask)  # outside the context: nothing is recorded
    assert cap.probs[1] is before
    with pytest.raises(KeyError, match="not captured"):
        cap.probs[0]


def test_no_layers_behaves_as_sdpa():
    model = build("llama")
    ids, mask = left_padded_batch()
    with torch.no_grad():
        plain = model(ids, attention_mask=mask).logits
        with AttentionCapture(model, layers=[]) as cap:
            out = model(ids, attention_mask=mask).logits
    assert torch.equal(out, plain) and len(cap.probs) == 0


def _probs_loss(probs: torch.Tensor) -> torch.Tensor:
    return (probs * torch.linspace(0, 1, probs.shape[-1])).sum()


def test_gradient_flows_through_probs_to_that_layer_only():
    model = build("qwen2")
    ids, mask = left_padded_batch()
    with AttentionCapture(model, layers=[1]) as cap:
        model(ids, attention_mask=mask)
        _probs_loss(cap.probs[1]).backward()
    layers = model.model.layers
    assert layers[1].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0  # layer 0 feeds layer 1
    assert layers[2].self_attn.q_proj.weight.grad is None  # above the captured layer
    assert layers[1].self_attn.v_proj.weight.grad is None  # probs do not depend on values


def _grads(model, ids, mask, backward_inside: bool) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    with AttentionCapture(model, layers=[0, 2]) as cap:
        out = model(ids, attention_mask=mask)
        loss = (
            out.logits.logsumexp(-1).mean() + _probs_loss(cap.probs[0]) + _probs_loss(cap.probs[2])
        )
        if backward_inside:
            loss.backward()
    if not backward_inside:
        loss.backward()  # the checkpointed layers replay on plain sdpa: must still match
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backward_inside", [True, False])
def test_gradient_checkpointing_gives_same_gradients(backward_inside):
    model = build("qwen3").train()
    ids, mask = left_padded_batch()
    reference = _grads(model, ids, mask, backward_inside)
    model.activation_checkpointing_enable()
    checkpointed = _grads(model, ids, mask, backward_inside)
    assert reference.keys() == checkpointed.keys()
    for name, grad in reference.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("padded", [True, False])
def test_no_grad_capture_and_kv_cache_decode(padded):
    """One decoding step (one query row against the cached keys) equals eager's row; unpadded,
    sdpa is handed no mask at all and the single row attends to every cached key."""
    model = build("qwen3")
    eager = twin(model)
    ids, mask = left_padded_batch()
    if not padded:
        mask = torch.ones_like(mask)
    step = torch.randint(1, 97, (3, 1), generator=torch.Generator().manual_seed(2))
    full_mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], dim=1)
    with torch.no_grad():
        cache = DynamicCache(config=eager.config)
        eager(ids, attention_mask=mask, cache=cache, use_cache=True)
        ref = eager(
            step, attention_mask=full_mask, cache=cache, use_cache=True, output_attentions=True
        )
        cache = DynamicCache(config=model.config)
        with AttentionCapture(model, layers=[2]) as cap:
            model(ids, attention_mask=mask, cache=cache, use_cache=True)
            assert cap.probs[2].shape == (3, 4, 8, 8)
            model(step, attention_mask=full_mask, cache=cache, use_cache=True)
    probs = cap.probs[2]
    assert probs.shape == (3, 4, 1, 9) and not probs.requires_grad
    torch.testing.assert_close(probs, ref.attentions[2], atol=1e-6, rtol=0)


def test_a_second_forward_in_one_context_replaces_the_probabilities_read_before():
    """Reading a layer caches its probabilities; the next forward's record must replace that
    entry (for every captured layer), so each read equals eager's rows of the latest input."""
    model = build("llama")
    eager = twin(model)
    ids, mask = left_padded_batch()
    other = torch.randint(1, 97, ids.shape, generator=torch.Generator().manual_seed(5))
    with AttentionCapture(model, layers=[0, 2]) as cap:
        for batch in (ids, other):
            model(batch, attention_mask=mask)
            with torch.no_grad():
                ref = eager(batch, attention_mask=mask, output_attentions=True).attentions
            for layer in (0, 2):
                assert cap.probs[layer].requires_grad
                torch.testing.assert_close(real_rows(cap.probs[layer], mask), real_rows(ref[layer], mask),
                                           atol=1e-6, rtol=0)


def test_capture_on_an_eager_model_keeps_output_attentions():
    model = build("llama", attn="eager")
    ids, mask = left_padded_batch()
    with torch.no_grad(), AttentionCapture(model, layers=[2]) as cap:
        out = model(ids, attention_mask=mask, output_attentions=True)
    torch.testing.assert_close(
        real_rows(cap.probs[2], mask), real_rows(out.attentions[2], mask), atol=1e-6, rtol=0
    )


def test_attention_probs_mask_formats_agree():
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 4, 6, 8, generator=g), torch.randn(2, 2, 6, 8, generator=g)
    pad = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    window = causal & ~torch.ones(6, 6, dtype=torch.bool).tril(-3)  # q - k < 3
    bool4d = window[None, None] & pad.bool()[:, None, None, :]
    float4d = torch.zeros(2, 1, 6, 6).masked_fill(~bool4d, torch.finfo(torch.float32).min)
    a = attention_probs(q, k, pad, 0.3, sliding_window=3)
    b = attention_probs(q, k, bool4d, 0.3, sliding_window=3)
    c = attention_probs(q, k, float4d, 0.3)
    torch.testing.assert_close(real_rows(a, pad), real_rows(b, pad))
    torch.testing.assert_close(b, c)
    none = attention_probs(q[:1], k[:1], None, 0.3)
    torch.testing.assert_close(none, attention_probs(q[:1], k[:1], causal[None, None], 0.3))
    torch.testing.assert_close(attention_probs(q, k, bool4d, 0.3, rows=slice(2, 5)), b[:, :, 2:5])
    # Flash reads a None mask as causal aligned to the last query, window included.
    flash = attention_probs(q[:, :, 2:], k, None, 0.3, sliding_window=3, flash_semantics=True)
    torch.testing.assert_close(flash, attention_probs(q, k, window[None, None], 0.3)[:, :, 2:])
    with pytest.raises(TypeError, match="BlockMask"):
        attention_probs(q, k, torch.ones(6), 0.3)


def test_errors_and_index_helpers():
    model = build("qwen2")
    assert attention_capture_supported(model)
    assert not attention_capture_supported(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="layer_idx runs 0..2"):
        AttentionCapture(model, layers=[3])
    with AttentionCapture(model, layers=[1]), pytest.raises(RuntimeError, match="already captured"):
        AttentionCapture(model, layers=[1]).__enter__()
    assert [attention_layer_of(k) for k in (1, 3)] == [0, 2]
    assert hidden_index_of(2) == 3
    with pytest.raises(ValueError, match="embedding"):
        attention_layer_of(0)
