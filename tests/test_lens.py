"""Logit lens: last layer reproduces the model's logits, lens_grad gradient paths, layer specs."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    CohereConfig,
    Gemma2Config,
    Gemma3TextConfig,
    GraniteConfig,
    HyperCLOVAXConfig,
    LlamaConfig,
    MiniCPM3Config,
    MptConfig,
    Qwen2Config,
    Qwen2Model,
    Qwen3Config,
)

from oisd_lab.lens import default_student_layer, find_readout, resolve_layers, student_layers

TINY = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    initializer_range=0.2,  # larger than default so that the lens differs visibly between layers
)

CONFIGS = {
    "qwen2-tied": lambda: Qwen2Config(**TINY, tie_word_embeddings=True),
    "qwen2-untied": lambda: Qwen2Config(**TINY, tie_word_embeddings=False),
    "llama-tied": lambda: LlamaConfig(**TINY, tie_word_embeddings=True),
    "llama-untied": lambda: LlamaConfig(**TINY, tie_word_embeddings=False),
    "qwen3": lambda: Qwen3Config(**TINY),
    "gemma2": lambda: Gemma2Config(**TINY, final_logit_softcapping=3.0, query_pre_attn_scalar=8),
    "gemma3": lambda: Gemma3TextConfig(
        **TINY, final_logit_softcapping=3.0, query_pre_attn_scalar=8
    ),
    "granite": lambda: GraniteConfig(**TINY, logits_scaling=4.0),
    "cohere": lambda: CohereConfig(**TINY, logit_scale=0.5, bos_token_id=1, eos_token_id=2),
    # MiniCPM3 divides the final hidden state by hidden_size / dim_model_base (here 4).
    "minicpm3": lambda: MiniCPM3Config(
        **{**TINY, "num_key_value_heads": 4}, q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=4,
        qk_rope_head_dim=4, v_head_dim=8, dim_model_base=8,
    ),
    "hyperclovax": lambda: HyperCLOVAXConfig(**TINY, logits_scaling=0.25),  # multiplies
    # MPT's config carries a logit_scale that its CausalLM forward does not apply.
    "mpt": lambda: MptConfig(
        vocab_size=97, d_model=32, n_heads=4, n_layers=3, logit_scale=2.0, initializer_range=0.2
    ),
}


def build(name: str, attn: str = "sdpa"):
    torch.manual_seed(0)
    # gemma2's attention softcap is refused by sdpa; MPT has no sdpa attention
    attn = "eager" if name in ("gemma2", "mpt") else attn
    model = AutoModelForCausalLM.from_config(CONFIGS[name](), attn_implementation=attn).eval()
    with torch.no_grad():  # norms start at 1 (or 0 for Gemma): make them matter
        for param_name, param in model.named_parameters():
            if "norm" in param_name:
                param.add_(0.3 * torch.randn_like(param))
    return model


def forward(model, seed: int = 1):
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(seed))
    return model(ids, output_hidden_states=True)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_last_layer_lens_equals_model_logits(name):
    model = build(name)
    readout = find_readout(model)
    assert readout.num_layers == 3
    with torch.no_grad():
        out = forward(model)
        for lens_grad in ("full", "hidden_only"):
            # Same ops in the same order as the CausalLM head: bit-identical on one device.
            assert torch.equal(readout.logits(out.hidden_states[-1], 3, lens_grad), out.logits)


def test_last_layer_is_not_normed_twice():
    model = build("qwen2-untied")
    readout = find_readout(model)
    with torch.no_grad():
        out = forward(model)
        twice = model.lm_head(model.model.norm(out.hidden_states[-1]))
        assert not torch.allclose(readout.logits(out.hidden_states[-1], 3), twice, atol=1e-3)


@pytest.mark.parametrize("name", ["qwen2-tied", "llama-untied", "qwen3", "gemma3"])
def test_intermediate_lens_is_unembed_of_norm(name):
    model = build(name)
    readout = find_readout(model)
    with torch.no_grad():
        out = forward(model)
        for layer in (0, 1, 2):
            manual = model.lm_head(model.model.norm(out.hidden_states[layer]))
            if name == "gemma3":
                manual = torch.tanh(manual / 3.0) * 3.0
            lens = readout.logits(out.hidden_states[layer], layer)
            torch.testing.assert_close(lens, manual, atol=1e-6, rtol=0)
            detached = readout.logits(out.hidden_states[layer], layer, "hidden_only")
            torch.testing.assert_close(detached, lens, atol=0, rtol=0)


@pytest.mark.parametrize("name", ["qwen2-tied", "llama-untied", "gemma3"])
def test_lens_grad_paths(name):
    model = build(name)
    readout = find_readout(model)
    hidden = forward(model).hidden_states[1].detach().requires_grad_(True)
    for lens_grad, expect_weight_grads in (("hidden_only", False), ("full", True)):
        model.zero_grad(set_to_none=True)
        hidden.grad = None
        readout.logits(hidden, 1, lens_grad).logsumexp(-1).sum().backward()
        assert hidden.grad is not None and hidden.grad.abs().sum() > 0
        for weight in (model.model.norm.weight, model.lm_head.weight):
            has_grad = weight.grad is not None and weight.grad.abs().sum() > 0
            assert has_grad == expect_weight_grads, (lens_grad, weight.shape)


def test_for_layer_works_on_token_chunks():
    model = build("qwen3")
    readout = find_readout(model)
    with torch.no_grad():
        h = forward(model).hidden_states[2]
        fn = readout.for_layer(2, "hidden_only")
        chunk = h.reshape(-1, h.shape[-1])[:5]  # [n, D]
        torch.testing.assert_close(fn(chunk), readout.logits(h, 2).reshape(-1, 97)[:5])


def test_for_layer_spans_every_hidden_state():
    """`for_layer` takes every entry of hidden_states, 0 (the embeddings) to L, as `logits` does."""
    model = build("qwen3")
    readout = find_readout(model)
    with torch.no_grad():
        hidden = forward(model).hidden_states
        for layer in (0, 1, 3):
            torch.testing.assert_close(readout.for_layer(layer)(hidden[layer]),
                                       readout.logits(hidden[layer], layer))
    for layer in (-1, 4):
        with pytest.raises(ValueError, match="0..3"):
            readout.for_layer(layer)


def test_readout_errors():
    readout = find_readout(build("qwen3"))
    h = torch.zeros(1, 32)
    with pytest.raises(ValueError, match="method.lens_grad"):
        readout.logits(h, 1, "frozen")
    with pytest.raises(ValueError, match="method.lens_grad"):
        readout.for_layer(1, "nope")
    with pytest.raises(ValueError, match="0..3"):
        readout.logits(h, 4)
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="Qwen2Model"):
        find_readout(Qwen2Model(Qwen2Config(**TINY)))


@pytest.mark.parametrize(
    "spec, expected",
    [
        (6, [6]),
        ([6, 26, 35], [6, 26, 35]),
        (-1, [35]),
        ([-2, 1], [1, 34]),
        (1 / 6, [6]),
        ([0.5, 18, 0.01, 0.999], [1, 18, 35]),  # fractions clamp into 1..35, duplicates merge
    ],
)
def test_resolve_layers(spec, expected):
    assert resolve_layers(spec, 36) == expected


@pytest.mark.parametrize(
    "spec, message",
    [
        (40, "layer 40 is out of range for a 30-layer model; use 1..29"),
        (30, "layer 30 is out of range"),  # the final layer is the teacher
        (0, "layer 0 is out of range"),  # the embeddings
        (-30, "layer -30 is out of range"),
        (1.0, "fraction 1.0 is out of range"),
        (0.0, "fraction 0.0 is out of range"),
        ([], "empty"),
        (True, "not an int"),
        (["6"], "not an int"),
    ],
)
def test_resolve_layers_errors(spec, message):
    with pytest.raises(ValueError, match=message) as err:
        resolve_layers(spec, 30)
    assert str(err.value).startswith("method.layers"), "the message names the field first"


def test_two_layer_model_has_one_student_layer():
    assert resolve_layers([1, -1, 0.5], 2) == [1]
    with pytest.raises(ValueError, match="^method.layers: a 1-layer model has no intermediate"):
        resolve_layers([1], 1)


def test_default_student_layer():
    assert [default_student_layer(n) for n in (36, 30, 28, 9, 2)] == [6, 5, 5, 2, 1]
    assert default_student_layer(15) == 3  # 2.5 rounds half up, not to even
    with pytest.raises(ValueError, match="no intermediate layer"):
        default_student_layer(1)


def test_student_layers_are_method_layers_resolved_or_the_default():
    assert student_layers([], 36) == student_layers(None, 36) == [default_student_layer(36)] == [6]
    assert student_layers([0.5, -1, 3, 3], 12) == resolve_layers([0.5, -1, 3, 3], 12) == [3, 6, 11]
    with pytest.raises(ValueError, match="method.layers"):
        student_layers([12], 12)  # the final layer is the teacher
    with pytest.raises(ValueError, match="method.layers"):
        student_layers(None, 1)
