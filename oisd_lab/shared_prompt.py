"""The shared prompt once: a group's prompt positions computed once, not once per completion.

The G completions of a group share their prompt, so a training forward over [prompt, completion]
rows runs the prompt's positions G times. `shared_prompt_forward` runs them once per distinct
prompt instead, in two forwards:

1. the prefix: the distinct prompts' first P-1 positions (the decoder stack only), recording every
   layer's keys and values as its attention receives them (after RoPE and any q/k norm);
2. the rest: each row's positions P-1 .. P-2+C (the last prompt token, then the completion up to
   its last predicting position) as a continuation of its prompt's prefix, at positions P-1...,
   attending to the prefix's keys and values (the row's own group's, picked by index, so the
   gradient of every completion flows back into the one prefix computation).

Causal attention makes this exact: a prompt position never sees a completion, so its keys and
values are the same in every row of the group; the completion rows see the same keys, values and
positions as in the whole-row forward, so their hidden states, attention rows and every gradient
are the same up to float rounding (tests/test_shared_prompt.py checks values and gradients).

The prefix reaches the layers as a read-only cache (`_PrefixLayer`: its `update` returns the
prefix joined with the new keys and stores nothing), so a checkpointed decoder layer replayed in
backward reads the same prefix: the layers are told they may keep the cache under gradient
checkpointing for the two forwards. The prefix's first P-1 positions are the whole rows' (the last
prompt token goes with the completion, whose first prediction it makes), so every quantity the
step reads (positions P-1 .. P-2+C) comes from the second forward.

Where it does not apply, the caller runs the whole rows (`applies`): no prompt repeated in the
micro-batch, a one-token prompt, sliding-window or other non-full attention layers, a model whose
decoder layers cannot keep a cache under checkpointing, a model sharded by FSDP (`strategy=fsdp`),
and the memory planner's trace on fake tensors (so a plan counts whole rows: an upper bound of
the policy forward's activations when prompts are shared).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator

import torch
from torch import nn
from torch._subclasses.fake_tensor import is_fake
from transformers.cache_utils import Cache, DynamicLayer

from .anatomy import backbone_of, decoder_layers

_CKPT_FLAG = "_can_checkpoint_with_cache"


class _RecordLayer(DynamicLayer):
    """Hands the keys and values back unchanged (no past) and keeps the first ones it sees: a
    checkpointed layer's replay in backward must not replace the forward's own tensors."""

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.keys, self.values, self.is_initialized = key_states, value_states, True
            self.device = key_states.device
        return key_states, value_states


class _PrefixLayer(DynamicLayer):
    """A fixed prefix [b, KVH, P-1, D] before the new keys and values; stores nothing."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.keys, self.values, self.is_initialized, self.device = keys, values, True, keys.device

    def update(self, key_states, value_states, *args, **kwargs):
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)


def groups_of(input_ids: torch.Tensor, attention_mask: torch.Tensor, prefix: int
              ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(rows of the distinct prefixes [n], each row's prefix index [b]) over the first `prefix`
    positions (ids and padding), or None when no prefix repeats. Fake tensors (the memory
    planner's trace) have no values to compare: None, so a plan counts whole rows, an upper bound."""
    if prefix < 1 or is_fake(input_ids):
        return None
    key = torch.cat([input_ids[:, :prefix], attention_mask[:, :prefix].to(input_ids.dtype)], dim=1)
    distinct, inverse = torch.unique(key, dim=0, return_inverse=True)
    if len(distinct) == len(key):
        return None
    first = torch.full((len(distinct),), len(key), dtype=torch.long, device=key.device)
    first = first.scatter_reduce(0, inverse, torch.arange(len(key), device=key.device), reduce="amin")
    return first, inverse


def applies(model: nn.Module) -> bool:
    """Whether the model's layers are all full attention (no sliding window, no linear attention)
    and not sharded by FSDP: FSDP2 gathers a layer's weights for its backward on the path of the
    layer's outputs, and the prefix's keys and values reach the backward around them."""
    from torch.distributed.fsdp import FSDPModule

    layers = list(decoder_layers(model))
    if any(isinstance(m, FSDPModule) for m in (model, *layers)):
        return False
    config = model.config.get_text_config()
    types = getattr(config, "layer_types", None) or ["full_attention"]
    if any(t != "full_attention" for t in types):
        return False
    if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
        return False
    return all(hasattr(layer, _CKPT_FLAG) for layer in layers)


@contextlib.contextmanager
def _cache_under_checkpointing(model: nn.Module) -> Iterator[None]:
    """The decoder layers keep a (read-only) cache when gradient checkpointing replays them."""
    layers = list(decoder_layers(model))
    saved = [layer.__dict__.get(_CKPT_FLAG) for layer in layers]
    for layer in layers:
        setattr(layer, _CKPT_FLAG, True)
    try:
        yield
    finally:
        for layer, value in zip(layers, saved, strict=True):
            if value is None:
                del layer.__dict__[_CKPT_FLAG]
            else:
                setattr(layer, _CKPT_FLAG, value)


def shared_prompt_forward(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                          prefix: int, groups: tuple[torch.Tensor, torch.Tensor], length: int, **kwargs):
    """The model's forward over positions prefix .. prefix+length-1 of every row, with the first
    `prefix` positions computed once per distinct prompt (`groups_of`). kwargs go to the second
    forward (e.g. output_hidden_states, logits_to_keep): its outputs cover those `length`
    positions only."""
    first, inverse = groups
    n_layers = len(decoder_layers(model))
    record = Cache(layers=[_RecordLayer() for _ in range(n_layers)])
    backbone = backbone_of(model)
    name = _cache_argument(backbone)
    with _cache_under_checkpointing(model):
        backbone(input_ids=input_ids[first, :prefix], attention_mask=attention_mask[first, :prefix],
                 use_cache=False, **{name: record})
        missing = [i for i, layer in enumerate(record.layers) if not layer.is_initialized]
        if missing:
            raise RuntimeError(f"shared prompt: decoder layers {missing} passed no keys through the cache")
        cache = Cache(layers=[_PrefixLayer(layer.keys.index_select(0, inverse), layer.values.index_select(0, inverse))
                              for layer in record.layers])
        del record
        return model(input_ids=input_ids[:, prefix:prefix + length],
                     attention_mask=attention_mask[:, :prefix + length], use_cache=False, **{name: cache}, **kwargs)


def _cache_argument(backbone: nn.Module) -> str:
    """The forward's name for the KV cache: `cache` (transformers >= 5.24) or `past_key_values`."""
    return "cache" if "cache" in inspect.signature(backbone.forward).parameters else "past_key_values"
