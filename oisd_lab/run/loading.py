"""Loading the policy a run starts from, with a one-line `ConfigError` naming the setting to fix
when its checkpoint cannot be read."""

from __future__ import annotations

from pathlib import Path

from ..config import TrainConfig
from ..errors import ConfigError, first_line
from ..models import is_tiny, load_pretrained


def load_start(cfg: TrainConfig, start_dir: Path):
    """The starting policy and tokenizer; a checkpoint that cannot be read is a one-line ConfigError."""
    try:
        return load_pretrained(start_dir, cfg.model.dtype, cfg.model.attn_implementation)
    except ConfigError:
        raise
    except Exception as err:  # safetensors, torch and json errors all mean the files are unreadable
        first = first_line(err)
        cause = err.__cause__ if isinstance(err, ValueError) and err.__cause__ else err
        line = first_line(cause)
        reason = f"{type(cause).__name__}: {line}" if line else type(cause).__name__
        if cfg.pretrain.init:
            raise ConfigError(f"pretrain.init: cannot load the checkpoint in {start_dir} ({reason}); save it "
                              "again with save_pretrained or point pretrain.init at another one") from err
        if isinstance(err, ValueError) and first.startswith("model."):
            raise ConfigError(first) from err  # load_pretrained's own message names the field
        if is_tiny(cfg.model.name):
            raise ConfigError(f"pretrain.cache_dir: the cached warm start {start_dir} cannot be loaded "
                              f"({reason}); delete that folder and it is rebuilt") from err
        raise ConfigError(f"model.name: cannot load {cfg.model.name} ({reason})") from err
