"""A model's transformers config without its weights: tiny presets, the configs shipped in
`configs/` (so that plans of the paper's models work offline), a local checkpoint directory, or a
hub id already in the local cache."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoConfig, PretrainedConfig

from ..config import ConfigError

CONFIGS = Path(__file__).with_name("configs")

ALIASES = {
    "smollm2": "SmolLM2-135M",
    "llama-3.2-3b": "OctoThinker-3B",
}
"""Lower-case names (or name prefixes) whose architecture is that of a shipped config."""


def shipped_configs() -> list[str]:
    return sorted(p.stem for p in CONFIGS.glob("*.json"))


def shipped_name(name: str) -> str | None:
    """The shipped config for a hub id: `Qwen/Qwen3-4B`, `Qwen3-4B-Base`, `OctoThinker/OctoThinker-3B-Long-Base`
    and `meta-llama/Llama-3.2-3B-Instruct` all name one (the longest shipped name the id starts with)."""
    base = name.rstrip("/").rsplit("/", 1)[-1].lower()
    candidates = {stem.lower(): stem for stem in shipped_configs()} | ALIASES
    hits = [key for key in candidates if base == key or base.startswith(key + "-")]
    return candidates[max(hits, key=len)] if hits else None


def load_model_config(name: str) -> PretrainedConfig:
    """Config of `model.name` without downloading anything."""
    # on use: the planner builds models and traces the step only when a plan is made
    from ..models import TINY_PRESETS, build_char_tokenizer, tiny_config

    if name in TINY_PRESETS:
        return tiny_config(name, vocab_size=len(build_char_tokenizer()))
    path = Path(name)
    if path.is_file() and path.suffix == ".json":
        return config_from_dict(json.loads(path.read_text()))
    if (path / "config.json").is_file():
        return AutoConfig.from_pretrained(path)
    try:  # the hub's own config when it is cached; else the shipped copy of its architecture
        return AutoConfig.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError) as err:
        shipped = shipped_name(name)
        if shipped:
            return config_from_dict(json.loads((CONFIGS / f"{shipped}.json").read_text()))
        raise ConfigError(
            f"model.name: no config for '{name}' offline; pass a checkpoint directory, a config.json file, "
            f"a hub id in the local cache or one of {', '.join(shipped_configs())}") from err


def config_from_dict(data: dict) -> PretrainedConfig:
    data = dict(data)
    model_type = data.pop("model_type", None)
    if model_type is None:
        raise ConfigError("model.name: the config file has no model_type; use a transformers config.json")
    return AutoConfig.for_model(model_type, **data)
