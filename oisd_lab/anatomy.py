"""The parts of a Hugging Face decoder-only causal LM that the lens, the hidden-state capture, the
attention capture, FSDP sharding and the planner read: the decoder stack (backbone), its list of
decoder layers, the final norm, the unembedding and the depth.

Found by attribute names shared across families (Llama/Qwen/Gemma/Mistral: ``model.norm`` and
``model.layers``; GPT-2/GPT-J: ``ln_f`` and ``h``; ...). A peft-wrapped model (`lora.attach`)
resolves to the same modules as the model it wraps: peft forwards attribute lookups to it.
"""

from __future__ import annotations

from torch import nn

# Attribute names of the final norm across HF decoder families (Llama/Qwen/Gemma/Mistral: ``norm``;
# GPT-2/GPT-J: ``ln_f``; Phi: ``final_layernorm``; OPT: ``final_layer_norm``; Mamba-like: ``norm_f``).
NORM_NAMES = ("norm", "final_layernorm", "ln_f", "final_layer_norm", "norm_f")
LAYER_LIST_NAMES = ("layers", "h", "blocks")


def find_backbone(model: nn.Module) -> nn.Module | None:
    """The decoder stack holding the final norm (``model.model`` for most CausalLMs), or None."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    candidates = [getattr(model, prefix, None) if prefix else None, getattr(model, "model", None)]
    try:
        candidates.append(model.get_decoder())
    except (AttributeError, ValueError, NotImplementedError):
        pass  # exotic wrappers: fall through to the other candidates
    for cand in candidates:
        if isinstance(cand, nn.Module) and any(
            isinstance(getattr(cand, n, None), nn.Module) for n in NORM_NAMES
        ):
            return cand
    return None


def backbone_of(model: nn.Module) -> nn.Module:
    """The decoder stack (`model.model` for Llama/Qwen): its forward returns no logits."""
    found = find_backbone(model)
    if found is None:
        raise ValueError(f"{type(model).__name__}: no decoder stack with a final norm found")
    return found


def final_norm_of(backbone: nn.Module) -> nn.Module:
    """The final norm of a decoder stack (the first of `NORM_NAMES` it has)."""
    return next(getattr(backbone, n) for n in NORM_NAMES if isinstance(getattr(backbone, n, None), nn.Module))


def final_norm(model: nn.Module) -> nn.Module:
    """The final norm of a causal LM (``model.model.norm`` for Llama/Qwen/Gemma)."""
    return final_norm_of(backbone_of(model))


def unembedding(model: nn.Module) -> nn.Module | None:
    """The output embedding (``lm_head``), or None when the model has none (a bare decoder stack)."""
    found = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return found if isinstance(found, nn.Module) else None


def layer_list(backbone: nn.Module) -> nn.ModuleList | None:
    """The decoder stack's list of decoder layers (the first of `LAYER_LIST_NAMES` it has), or None."""
    for name in LAYER_LIST_NAMES:
        layers = getattr(backbone, name, None)
        if isinstance(layers, nn.ModuleList):
            return layers
    return None


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a causal LM, bottom to top (``model.model.layers`` for Llama/Qwen)."""
    layers = layer_list(backbone_of(model))
    if layers is None:
        raise ValueError(f"{type(model).__name__}: no list of decoder layers ({', '.join(LAYER_LIST_NAMES)})")
    return layers


def num_layers(model: nn.Module, backbone: nn.Module) -> int | None:
    """The depth L: the text config's ``num_hidden_layers``, else the length of the layer list."""
    n = getattr(model.config.get_text_config(), "num_hidden_layers", None)
    if n is None:
        layers = layer_list(backbone)
        return None if layers is None else len(layers)
    return n
