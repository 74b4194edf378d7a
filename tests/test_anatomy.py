"""`anatomy`: the decoder stack, decoder layers, final norm and unembedding of each supported
family are the modules the model's own forward uses, a peft-wrapped model resolves to the same
modules, and the lens, the hidden-state capture, the attention capture and FSDP sharding all read
them from here."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

from oisd_lab import anatomy, sharding
from oisd_lab.attention import attention_modules
from oisd_lab.lens import find_readout
from oisd_lab.lora import attach

TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8)
FAMILIES = {"qwen2": Qwen2Config, "qwen3": Qwen3Config, "llama": LlamaConfig}


def build(family: str):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(FAMILIES[family](**TINY)).eval()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_parts_are_the_modules_the_forward_uses(family):
    model = build(family)
    assert anatomy.backbone_of(model) is model.model
    assert anatomy.decoder_layers(model) is model.model.layers and len(model.model.layers) == 3
    assert anatomy.final_norm(model) is model.model.norm
    assert anatomy.unembedding(model) is model.lm_head
    assert anatomy.num_layers(model, model.model) == 3
    readout = find_readout(model)
    assert readout.norm is model.model.norm and readout.unembed is model.lm_head and readout.num_layers == 3
    assert sharding.decoder_layers(model) == list(model.model.layers)
    attn = attention_modules(model)
    assert sorted(attn) == [0, 1, 2] and all(attn[i] is model.model.layers[i].self_attn for i in attn)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_peft_wrapped_model_has_the_same_parts(family):
    model = build(family)
    wrapped = attach(model, rank=2, alpha=4.0, dropout=0.0, targets=["q_proj", "v_proj"])
    assert anatomy.backbone_of(wrapped) is model.model
    assert anatomy.decoder_layers(wrapped) is model.model.layers
    assert anatomy.final_norm(wrapped) is model.model.norm
    assert anatomy.unembedding(wrapped) is model.lm_head
    readout = find_readout(wrapped)
    assert readout.norm is model.model.norm and readout.unembed is model.lm_head and readout.num_layers == 3
    attn = attention_modules(wrapped)
    assert all(attn[i] is model.model.layers[i].self_attn for i in [0, 1, 2])


def test_a_bare_decoder_stack_is_its_own_backbone_and_has_no_unembedding():
    model = build("qwen3").model
    assert anatomy.backbone_of(model) is model and anatomy.decoder_layers(model) is model.layers
    assert anatomy.unembedding(model) is None


def test_a_module_without_a_decoder_is_refused_with_its_name():
    with pytest.raises(ValueError, match="Linear: no decoder stack"):
        anatomy.decoder_layers(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="strategy: fsdp needs a decoder"):
        sharding.decoder_layers(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="no attention modules"):
        attention_modules(nn.Linear(2, 2))
