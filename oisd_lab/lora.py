"""LoRA adapters through peft: low-rank updates on the decoder layers' projections while the rest
of the model (embeddings, final norm, unembedding) stays frozen.

The logit lens reads the student layer through the frozen final norm and unembedding, so with
LoRA the alignment losses train the adapters below the student layer only; the attention capture
and the per-layer view see the adapted projections (peft wraps them, and the recomputed q/k are
those of the forward). The final model is saved twice: merged into the base weights
(`final_model/`, loadable without peft) and as the adapters alone (`final_model/adapter/`,
`peft.PeftModel.from_pretrained(base, path)`).
"""

from __future__ import annotations

import copy
from pathlib import Path

ADAPTER_DIR = "adapter"


def attach(model, rank: int, alpha: float, dropout: float, targets: list[str]):
    """`model` with LoRA adapters of `rank` on the modules named in `targets` (peft's
    `target_modules`); only the adapters require gradients."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets),
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def is_lora(model) -> bool:
    return hasattr(model, "peft_config")


def merged(model):
    """A copy of `model` with its adapters merged into the base weights (no peft wrapper)."""
    return copy.deepcopy(model).merge_and_unload()


def save(model, folder: Path) -> None:
    """The merged model into `folder`, the adapters into `folder / ADAPTER_DIR`."""
    merged(model).save_pretrained(folder)
    model.save_pretrained(folder / ADAPTER_DIR)
