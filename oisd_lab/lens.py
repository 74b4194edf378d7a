"""Logit lens for Hugging Face decoder-only causal LMs, and the ``method.layers`` resolver.

The OISD student distribution is ``p_l = softmax(W_U · Norm(h_l))``: the model's own final norm and
unembedding applied to an intermediate hidden state (no new heads). `anatomy.py` finds those two
modules (plus the final logit soft-capping of Gemma 2/3, the logit scaling of Granite, Cohere, MiniCPM3 and HyperCLOVA X)
and applies them to any entry of ``output_hidden_states``.

Indexing (transformers 5.x): ``hidden_states`` has ``num_layers + 1`` entries. Entry 0 is the
embedding output, entry ``k`` (1 <= k <= num_layers) is the output of the k-th decoder layer (the
layer whose attention module has ``layer_idx == k - 1``). The LAST entry is already final-normed in
HF, so the lens of entry ``num_layers`` is the unembedding only (normalising twice is a classic
logit-lens bug); every other entry gets ``unembed(norm(h))``.

``lens_grad`` (see docs/oisd-method.md, "Gradient path through the readout"):
- ``"full"``: plain modules; the alignment gradient reaches the final norm and W_U (and the input
  embeddings when they are tied).
- ``"hidden_only"``: norm and unembedding run with detached parameters, so only the hidden state
  (hence only layers <= l) receives gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from .anatomy import NORM_NAMES, final_norm_of, find_backbone, num_layers, unembedding
from .options import LENS_GRAD_MODES


def _check_lens_grad(lens_grad: str) -> None:
    if lens_grad not in LENS_GRAD_MODES:
        raise ValueError(f"method.lens_grad must be one of {LENS_GRAD_MODES}, got {lens_grad!r}")


def _call_detached(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run ``module(x)`` with its parameters detached: gradient reaches ``x`` only.

    ``functional_call`` reuses the module's own forward, so every norm variant (Gemma's
    ``1 + weight``, float32 upcasts, biases) is reproduced bit for bit without re-implementing it.
    """
    params = {name: p.detach() for name, p in module.named_parameters()}
    return torch.func.functional_call(module, params, (x,))


@dataclass(frozen=True, eq=False)
class Readout:
    """The final norm + unembedding of a causal LM, applied as a logit lens.

    Attributes:
        norm: the final norm module (``model.model.norm`` for Llama/Qwen/Gemma).
        unembed: the output embedding (``model.get_output_embeddings()``, i.e. ``lm_head``).
        num_layers: number of decoder layers L; valid lens indices are 0..L.
        final_logit_softcapping: Gemma 2/3 ``cap * tanh(logits / cap)``, or None.
        logit_scale: Cohere and HyperCLOVA X multiply the logits by this, or None.
        logits_scaling: Granite and MiniCPM3 divide the logits by this, or None.
    """

    norm: nn.Module
    unembed: nn.Module
    num_layers: int
    final_logit_softcapping: float | None = None
    logit_scale: float | None = None
    logits_scaling: float | None = None

    def logits(self, hidden: torch.Tensor, layer: int, lens_grad: str = "full",
               norm: bool = True) -> torch.Tensor:
        """Lens logits ``[..., V]`` of ``hidden`` ``[..., D]`` taken from ``hidden_states[layer]``.

        Mirrors the CausalLM head: ``unembed(norm(h))`` then the model's logit post-processing, in
        the same op order as transformers so that the last layer reproduces ``model(...).logits``.
        ``norm=False`` skips the final norm (``unembed(h)``, as BuPO decodes intermediate layers);
        the last entry is final-normed by the model either way.
        """
        _check_lens_grad(lens_grad)
        if not 0 <= layer <= self.num_layers:
            raise ValueError(
                f"lens layer {layer} is out of range: hidden_states has entries 0..{self.num_layers}"
            )
        run = _call_detached if lens_grad == "hidden_only" else (lambda m, x: m(x))
        h = hidden if layer == self.num_layers or not norm else run(self.norm, hidden)  # last is normed
        logits = run(self.unembed, h)
        if self.logits_scaling is not None:
            logits = logits / self.logits_scaling
        if self.logit_scale is not None:
            logits = logits * self.logit_scale
        if self.final_logit_softcapping is not None:
            cap = self.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        return logits

    def for_layer(
        self, layer: int, lens_grad: str = "full", norm: bool = True
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """A callable ``h [n, D] -> logits [n, V]`` for one (layer, lens_grad, norm), e.g. for chunked losses."""
        _check_lens_grad(lens_grad)
        if not 0 <= layer <= self.num_layers:
            raise ValueError(
                f"lens layer {layer} is out of range: hidden_states has entries 0..{self.num_layers}"
            )
        return partial(self.logits, layer=layer, lens_grad=lens_grad, norm=norm)


def find_readout(model: nn.Module) -> Readout:
    """Locate final norm, unembedding, logit post-processing and depth of a causal LM.

    Raises:
        ValueError: naming the model class when a piece cannot be found.
    """
    name = type(model).__name__
    unembed = unembedding(model)
    if unembed is None:
        raise ValueError(
            f"find_readout: {name} has no output embedding (lm_head); need a *ForCausalLM"
        )
    backbone = find_backbone(model)
    if backbone is None:
        raise ValueError(
            f"find_readout: cannot find the final norm of {name} (looked for {NORM_NAMES} on the "
            "base model); build the Readout by hand"
        )
    norm = final_norm_of(backbone)
    depth = num_layers(model, backbone)
    if not depth:
        raise ValueError(f"find_readout: cannot find the number of decoder layers of {name}")
    cfg = model.config.get_text_config()
    return Readout(
        norm=norm,
        unembed=unembed,
        num_layers=int(depth),
        final_logit_softcapping=getattr(cfg, "final_logit_softcapping", None),
        **_logit_scales(name, cfg),
    )


def _logit_scales(name: str, cfg) -> dict[str, float | None]:
    """The logit scale factors of the families whose CausalLM forward applies one, as `Readout`'s
    `logit_scale` (multiplies) and `logits_scaling` (divides). Cohere multiplies by
    `logit_scale`; Granite divides by `logits_scaling`, MiniCPM3 divides the final hidden state by
    it (the same, the head being linear), HyperCLOVA X multiplies by it. Other families carry
    such a field without applying it (MPT's `logit_scale`)."""
    if "Cohere" in name:
        return {"logit_scale": cfg.logit_scale}
    if "HyperCLOVAX" in name:
        return {"logit_scale": cfg.logits_scaling}
    if "Granite" in name or "MiniCPM3" in name:
        return {"logits_scaling": cfg.logits_scaling}
    return {}


def _round_half_up(x: float) -> int:
    # Python's round() is banker's rounding (round(2.5) == 2); half-up is what people expect.
    return int(math.floor(x + 0.5))


def _layer_error(what: str, num_layers: int) -> ValueError:
    return ValueError(
        f"method.layers: {what} is out of range for a {num_layers}-layer model; use "
        f"1..{num_layers - 1}, a negative index or a fraction in (0,1)"
    )


def _resolve_one(item: int | float, num_layers: int) -> int:
    if isinstance(item, bool) or not isinstance(item, (int, float)):
        raise ValueError(f"method.layers: {item!r} is not an int or a float")
    if isinstance(item, float):
        if not 0.0 < item < 1.0:
            raise _layer_error(f"fraction {item}", num_layers)
        return min(max(_round_half_up(item * num_layers), 1), num_layers - 1)
    layer = num_layers + item if item < 0 else item
    if not 1 <= layer <= num_layers - 1:
        raise _layer_error(f"layer {item}", num_layers)
    return layer


def resolve_layers(spec: int | float | Sequence[int | float], num_layers: int) -> list[int]:
    """Resolve ``method.layers`` to sorted, unique ``hidden_states`` indices in ``1..num_layers-1``.

    - int ``k >= 0``: ``hidden_states[k]``, the output of decoder layer k (1-based); 0 (embeddings)
      and ``num_layers`` (the final layer, i.e. the teacher) are rejected.
    - int ``k < 0``: counts from the top over intermediate layers: ``-1 -> num_layers - 1`` (the
      last intermediate layer), ``-2 -> num_layers - 2``, ... NOTE: unlike Python indexing of
      ``hidden_states``, -1 is NOT the final layer, which can never be a student.
    - float ``f`` in (0,1): ``round(f * num_layers)`` (half up), clamped into ``[1, num_layers-1]``.
    """
    if num_layers < 2:
        raise ValueError(f"method.layers: a {num_layers}-layer model has no intermediate layer")
    items = [spec] if isinstance(spec, (int, float)) else list(spec)
    if not items:
        raise ValueError(
            "method.layers is empty; give at least one layer (e.g. a fraction like 0.17)"
        )
    return sorted({_resolve_one(item, num_layers) for item in items})


def default_student_layer(num_layers: int) -> int:
    """About 1/6 of depth (the paper's layer 6 of 36), as a ``hidden_states`` index."""
    if num_layers < 2:
        raise ValueError(f"method.layers: a {num_layers}-layer model has no intermediate layer")
    return min(max(1, _round_half_up(num_layers / 6)), num_layers - 1)


def student_layers(spec: Sequence[int | float] | None, num_layers: int) -> list[int]:
    """The student layers of a run: ``method.layers`` resolved (`resolve_layers`), or the default
    student layer (`default_student_layer`) when it is empty."""
    return resolve_layers(list(spec or [default_student_layer(num_layers)]), num_layers)
