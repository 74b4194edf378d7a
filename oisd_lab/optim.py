"""The policy's optimizer: torch's AdamW, or an AdamW that keeps small updates on half-precision weights.

Half-precision weights lose any update below half their spacing (bf16 near 0.02: ~1e-4), and an
AdamW step is about lr. The default recipe therefore keeps float32 weights and computes in bf16
(`precision=bf16-mixed`). Where float32 weights and states do not fit, `adamw_kahan` is
torch-optimi's AdamW with Kahan summation: the part of each update that rounds away is kept in a
compensation buffer of the weight's dtype and added back on the next step, so the weight plus its
buffer follows the float32 trajectory (one extra half-precision tensor per weight).
"""

from __future__ import annotations

import importlib.util

import torch

from .config import ConfigError

BETAS = (0.9, 0.999)
EPS = 1e-8
"""torch.optim.AdamW's defaults, also passed to torch-optimi (whose own defaults differ)."""


def kahan_available() -> bool:
    return importlib.util.find_spec("optimi") is not None


def build_optimizer(params, grpo) -> torch.optim.Optimizer:
    """AdamW over `params` with `grpo.lr`, `grpo.weight_decay`, by `grpo.optimizer`."""
    if grpo.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=grpo.lr, betas=BETAS, eps=EPS, weight_decay=grpo.weight_decay)
    if grpo.optimizer != "adamw_kahan":
        raise ConfigError(f"grpo.optimizer: unknown value '{grpo.optimizer}'; choose one of adamw, adamw_kahan")
    if not kahan_available():
        raise ConfigError("grpo.optimizer: adamw_kahan needs torch-optimi; run `pip install -e .[lowmem]`")
    import optimi

    return optimi.AdamW(params, lr=grpo.lr, betas=BETAS, eps=EPS, weight_decay=grpo.weight_decay,
                        kahan_sum=True, foreach=False)
