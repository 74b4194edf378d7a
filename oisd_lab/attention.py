"""Attention probabilities of chosen layers only, with the rest of the model left on sdpa/flash.

SDPA and flash attention return no attention weights, and switching a whole model to eager costs
time and memory on every layer. OISD needs the post-softmax rows of two layers (student and
final), so this module captures the *inputs* of those layers' attention (post-RoPE, post q/k-norm
query and key, plus the mask) and recomputes ``softmax(q k^T * scaling + mask)`` from them.

How (verified against transformers 5.24): every attention module of the supported families calls
``ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager)``. While an
``AttentionCapture`` is active, each chosen attention module gets a shallow copy of its config whose
implementation is ``"oisd_capture"``, a function registered with ``AttentionInterface.register``.
That function records (q, k, mask, scaling, ...) and then delegates to the module's original
implementation (sdpa, eager, flash, ...) with the original mask, so the model's outputs are those
of the original implementation bit for bit. The model-level config is never touched, hence the
mask builder and all other layers behave exactly as before. On exit the original configs return.

Probabilities are computed lazily, on first access, outside the decoder layer. That keeps
gradient checkpointing sound: the checkpointed layer saves exactly the tensors of the original
implementation, so its backward recomputation (which may run after the context has exited, i.e.
on plain sdpa) matches; the gradient of a loss on the probabilities flows into q and k, and from
there into the recomputed layer. Under ``torch.no_grad`` the probabilities are computed at once
(nothing to backpropagate, and a static KV cache may be overwritten in place later), unless the
capture is ``lazy``: then q/k are kept as with grad, and a caller without a KV cache (the
per-layer diagnostics) reads one layer and one block of rows at a time with ``probs_for``.

Departures from eager: the captured probabilities are the softmax BEFORE attention dropout (the
distribution to align; all supported families use dropout 0.0 anyway), and models with attention
sinks (``s_aux``) are refused.

Index mapping: ``hidden_states[k]`` (k >= 1) is the output of the decoder layer whose attention
module has ``layer_idx == k - 1``. So the student lens index ``k`` pairs with attention layer
``k - 1`` and the final layer (teacher) with attention layer ``num_layers - 1``; see
``attention_layer_of`` / ``hidden_index_of``.
"""

from __future__ import annotations

import copy
import inspect
import sys
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .anatomy import decoder_layers

CAPTURE_IMPLEMENTATION = "oisd_capture"


def attention_layer_of(hidden_index: int) -> int:
    """Attention ``layer_idx`` of the decoder layer that outputs ``hidden_states[hidden_index]``."""
    if hidden_index < 1:
        raise ValueError(
            f"hidden_states[{hidden_index}] is the embedding output: no attention layer"
        )
    return hidden_index - 1


def hidden_index_of(layer_idx: int) -> int:
    """``hidden_states`` index of the output of the decoder layer with attention ``layer_idx``."""
    if layer_idx < 0:
        raise ValueError(f"attention layer_idx must be >= 0, got {layer_idx}")
    return layer_idx + 1


def repeat_kv(key: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, KVH, S, D] -> [B, KVH * n_rep, S, D] (grouped-query heads; same layout as HF)."""
    if n_rep == 1:
        return key
    b, kvh, s, d = key.shape
    return key[:, :, None].expand(b, kvh, n_rep, s, d).reshape(b, kvh * n_rep, s, d)


def _allowed_keys(
    mask: torch.Tensor | None,
    t: int,
    s: int,
    device: torch.device,
    is_causal: bool,
    sliding_window: int | None,
    flash_semantics: bool,
) -> torch.Tensor | None:
    """Boolean [B|1, 1, T, S] of attendable keys for a None, 2D padding or 4D boolean mask."""
    if mask is not None and mask.dim() == 4:
        return mask[..., :s]  # sdpa-style: causal, padding and sliding window already folded in
    if mask is None and not flash_semantics:
        # HF only hands sdpa a None mask when sdpa's own is_causal (upper-left aligned, single
        # query -> no mask) is right, and never when a sliding window binds.
        if not is_causal or t == 1:
            return None
        return torch.ones(t, s, dtype=torch.bool, device=device).tril()[None, None]
    # Flash semantics (2D [B, S] padding mask or None): the kernel aligns the causal diagonal to
    # the last query and applies the sliding window itself.
    q_pos = torch.arange(t, device=device)[:, None] + (s - t)
    k_pos = torch.arange(s, device=device)[None, :]
    allowed = k_pos <= q_pos if is_causal else torch.ones(t, s, dtype=torch.bool, device=device)
    if sliding_window is not None:
        allowed = allowed & (q_pos - k_pos < sliding_window)
    allowed = allowed[None, None]
    return allowed if mask is None else allowed & mask[:, None, None, :s].bool()


def _check_mask(attention_mask: object) -> None:
    if attention_mask is None or (
        isinstance(attention_mask, torch.Tensor) and attention_mask.dim() in (2, 4)
    ):
        return
    raise TypeError(
        "attention capture supports None, 2D or 4D tensor masks, got "
        f"{type(attention_mask).__name__}{tuple(getattr(attention_mask, 'shape', ()))} "
        "(a flex-attention BlockMask is not supported)"
    )


def attention_probs(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    softcap: float | None = None,
    sliding_window: int | None = None,
    is_causal: bool = True,
    rows: slice | None = None,
    flash_semantics: bool = False,
    keys: int | None = None,
) -> torch.Tensor:
    """Eager attention probabilities [B, H, T, S] from q [B, H, T, D] and k [B, KVH, S, D].

    Mirrors transformers' ``eager_attention_forward`` (scores in the query dtype, softmax in
    float32, cast back), minus dropout. ``attention_mask``: None, a 2D [B, S] padding mask, a 4D
    boolean mask (True = attend, as built for sdpa) or a 4D additive float mask (as for eager).
    ``rows`` keeps only those query rows ([B, H, len(rows), S]; saves memory when only completion
    rows are needed). Fully masked query rows (left padding) come out uniform, as in eager.
    ``flash_semantics``: read a None mask as flash attention does (causal aligned to the last
    query, ``sliding_window`` applied) instead of as sdpa does (upper-left causal, no window).
    ``keys`` keeps only the first ``keys`` keys ([..., :keys]); exact when none of the kept query
    rows may attend beyond them (causal rows up to position ``keys - 1``), and then cheaper.
    """
    _check_mask(attention_mask)
    t, s = query.shape[2], key.shape[2]
    if (
        attention_mask is not None
        and attention_mask.dim() == 4
        and attention_mask.is_floating_point()
    ):
        additive, allowed = attention_mask[..., :s], None
    else:
        additive = None
        allowed = _allowed_keys(
            attention_mask, t, s, query.device, is_causal, sliding_window, flash_semantics
        )
    if rows is not None:
        # Masks are built for all T rows first: a None mask's causal pattern depends on the row.
        query = query[:, :, rows]
        if additive is not None and additive.shape[2] > 1:
            additive = additive[:, :, rows]
        if allowed is not None and allowed.shape[2] > 1:
            allowed = allowed[:, :, rows]
    if keys is not None and keys < s:
        key = key[:, :, :keys]
        additive = None if additive is None else additive[..., :keys]
        allowed = None if allowed is None else allowed[..., :keys]
    k = repeat_kv(key, query.shape[1] // key.shape[1])
    scores = torch.matmul(query, k.transpose(2, 3)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if additive is not None:
        scores = scores + additive
    elif allowed is not None:
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)


@dataclass
class _Record:
    """Inputs of one layer's attention call, enough to recompute its probabilities."""

    query: torch.Tensor
    key: torch.Tensor
    mask: torch.Tensor | None
    scaling: float
    softcap: float | None
    sliding_window: int | None
    is_causal: bool
    flash_semantics: bool

    def probs(self, rows: slice | None = None, keys: int | None = None) -> torch.Tensor:
        return attention_probs(
            self.query,
            self.key,
            self.mask,
            self.scaling,
            self.softcap,
            self.sliding_window,
            self.is_causal,
            rows,
            self.flash_semantics,
            keys if self.is_causal else None,  # a non-causal row may attend to any key
        )

    @property
    def needs_grad(self) -> bool:
        return self.query.requires_grad or self.key.requires_grad


@dataclass
class _Route:
    capture: AttentionCapture
    delegate: Callable
    implementation: str


# Active routes: attention module -> (capture, original implementation). Weak keys so a model that
# is dropped inside a context does not stay alive.
_ROUTES: weakref.WeakKeyDictionary[nn.Module, _Route] = weakref.WeakKeyDictionary()


def _in_backward() -> bool:
    # A checkpointed layer is re-run during backward; that replay must not overwrite the record.
    task_id = getattr(torch._C, "_current_graph_task_id", None)  # -1 outside backward
    return task_id is not None and task_id() != -1


def _capture_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The ``oisd_capture`` attention function: record q/k/mask, then run the original one."""
    route = _ROUTES.get(module)
    if route is None:
        raise RuntimeError(
            f"{type(module).__name__} (layer {getattr(module, 'layer_idx', '?')}) uses "
            f"attn_implementation={CAPTURE_IMPLEMENTATION!r} outside an AttentionCapture; "
            "use the AttentionCapture context manager instead of setting it by hand"
        )
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError("attention capture does not support attention sinks (s_aux)")
    if not _in_backward():
        is_causal = kwargs.get("is_causal")
        record = _Record(
            query=query,
            key=key,
            mask=attention_mask,
            # sdpa's default scale when a module passes none
            scaling=query.shape[-1] ** -0.5 if kwargs.get("scaling") is None else kwargs["scaling"],
            softcap=kwargs.get("softcap"),
            sliding_window=kwargs.get("sliding_window"),
            is_causal=getattr(module, "is_causal", True) if is_causal is None else bool(is_causal),
            flash_semantics="flash" in route.implementation,
        )
        route.capture._store(module.layer_idx, record)
    return route.delegate(module, query, key, value, attention_mask, **kwargs)


def _uses_attention_interface(module: nn.Module) -> bool:
    try:
        return "ALL_ATTENTION_FUNCTIONS" in inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return False


def attention_modules(model: nn.Module) -> dict[int, nn.Module]:
    """Self-attention modules of a decoder-only model's decoder layers, by ``layer_idx``.

    Raises:
        ValueError: when the model has no attention modules with ``layer_idx`` and a config, two
            share a ``layer_idx`` (e.g. cross-attention), or they do not dispatch through
            ``ALL_ATTENTION_FUNCTIONS`` (then the capture function would never be called).
    """
    found: dict[int, nn.Module] = {}
    name = type(model).__name__
    try:
        layers = decoder_layers(model)
    except ValueError:
        raise ValueError(f"attention capture: {name} has no attention modules with a layer_idx") from None
    for mod_name, module in layers.named_modules(prefix="layers"):
        if "Attention" not in type(module).__name__ or not isinstance(
            getattr(module, "layer_idx", None), int
        ):
            continue
        if not hasattr(getattr(module, "config", None), "_attn_implementation"):
            raise ValueError(f"attention capture: {mod_name} of {name} has no config to redirect")
        if not _uses_attention_interface(module):
            raise ValueError(
                f"attention capture: {type(module).__name__} of {name} does not dispatch through "
                "transformers' AttentionInterface; use attn_implementation='eager' and output_attentions"
            )
        if module.layer_idx in found:
            raise ValueError(
                f"attention capture: {name} has two attention modules with layer_idx {module.layer_idx}"
            )
        found[module.layer_idx] = module
    if not found:
        raise ValueError(f"attention capture: {name} has no attention modules with a layer_idx")
    return found


def attention_capture_supported(model: nn.Module) -> bool:
    """Whether ``AttentionCapture`` can capture this model's attention layers."""
    try:
        attention_modules(model)
    except ValueError:
        return False
    return True


def _original_implementation(module: nn.Module) -> Callable:
    """The function ``module`` would call without capture (its modeling file's eager for 'eager')."""
    impl = module.config._attn_implementation
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if impl == CAPTURE_IMPLEMENTATION:
        raise RuntimeError(
            f"attention layer {module.layer_idx} is already captured by another AttentionCapture"
        )
    if impl in (None, "eager"):
        if eager is None:
            raise ValueError(
                f"attention capture: no eager_attention_forward for {type(module).__name__}"
            )
        return eager
    return ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager)


class _ProbsView(Mapping):
    """Read-only mapping layer_idx -> probabilities [B, H, T, S], computed on first access."""

    def __init__(self, capture: AttentionCapture) -> None:
        self._capture = capture

    def __getitem__(self, layer: int) -> torch.Tensor:
        return self._capture._probs(layer)

    def __contains__(self, layer: object) -> bool:
        return layer in self._capture._records  # without computing anything

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(self._capture._records))

    def __len__(self) -> int:
        return len(self._capture._records)


class AttentionCapture:
    """Capture the attention probabilities of chosen layers during forward passes.

    >>> with AttentionCapture(model, layers=[2, 6]) as cap:   # attention layer_idx, 0-based
    ...     out = model(input_ids, attention_mask=mask)
    >>> cap.probs[2]   # [B, H, T, S], differentiable when the forward ran with grad

    ``layers`` are attention ``layer_idx`` values (``attention_layer_of(k)`` for a hidden-state
    index k). Each entry holds the most recent forward's probabilities; entering clears them.
    Padded query rows are uniform (as in eager): mask them out of any loss. Not for
    ``torch.compile``d models. Contexts can nest only on disjoint layers.
    """

    def __init__(self, model: nn.Module, layers: Iterable[int] = (), lazy: bool = False) -> None:
        self.model = model
        self.lazy = lazy
        """Keep q/k under no_grad too (forwards with ``use_cache=False`` only: a KV cache may
        be updated in place after the capture)."""
        self.layers = sorted({int(layer) for layer in layers})
        modules = attention_modules(model) if self.layers else {}
        missing = [layer for layer in self.layers if layer not in modules]
        if missing:
            raise ValueError(
                f"attention capture: layers {missing} out of range for {type(model).__name__}; "
                f"attention layer_idx runs 0..{max(modules)} (hidden_states index k <-> layer_idx k-1)"
            )
        self._modules = {layer: modules[layer] for layer in self.layers}
        self._saved_configs: dict[int, object] = {}
        self._records: dict[int, _Record | torch.Tensor] = {}
        self._cache: dict[tuple[int, bool], torch.Tensor] = {}

    def __enter__(self) -> AttentionCapture:
        AttentionInterface.register(CAPTURE_IMPLEMENTATION, _capture_attention)
        self.clear()
        try:
            for layer, module in self._modules.items():
                impl = str(module.config._attn_implementation)
                route = _Route(self, _original_implementation(module), impl)
                view = copy.copy(module.config)
                # Set the internal field: the public setter would also rewrite shared sub-configs.
                view._attn_implementation_internal = CAPTURE_IMPLEMENTATION
                self._saved_configs[layer] = module.config
                _ROUTES[module] = route
                module.config = view
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._restore()

    def _restore(self) -> None:
        for layer, config in list(self._saved_configs.items()):
            module = self._modules[layer]
            module.config = config
            _ROUTES.pop(module, None)
            del self._saved_configs[layer]

    @property
    def probs(self) -> Mapping[int, torch.Tensor]:
        """layer_idx -> attention probabilities [B, H, T, S] of the latest forward."""
        return _ProbsView(self)

    def clear(self) -> None:
        """Drop all recorded tensors (frees the q/k kept alive for lazy recomputation)."""
        self._records.clear()
        self._cache.clear()

    def _store(self, layer: int, record: _Record) -> None:
        self._cache = {k: v for k, v in self._cache.items() if k[0] != layer}
        # Without grad there is nothing to backpropagate: compute now, before a KV cache that is
        # updated in place could change the recorded key.
        self._records[layer] = record if torch.is_grad_enabled() or self.lazy else record.probs()

    def probs_for(
        self, layer: int, rows: slice | None = None, keys: int | None = None
    ) -> torch.Tensor:
        """Probabilities of ``layer`` for query ``rows`` only: [B, H, len(rows), S], not cached.

        Recomputes from the recorded q/k, so only those rows are materialised (e.g. the completion
        rows of a long prompt). After a no-grad forward the full tensor is sliced instead.
        ``keys``: for a causal layer, only the first ``keys`` keys ([..., :keys]); the caller
        promises the rows attend to none beyond them (see ``attention_probs``).
        """
        if layer not in self._records:
            raise KeyError(
                f"attention layer {layer} was not captured (captured: {sorted(self._records)})"
            )
        record = self._records[layer]
        if isinstance(record, torch.Tensor):
            record = record if rows is None else record[:, :, rows]
            return record if keys is None else record[..., :keys]
        return record.probs(rows, keys)

    def _probs(self, layer: int) -> torch.Tensor:
        if layer not in self._records:
            raise KeyError(
                f"attention layer {layer} was not captured (captured: {sorted(self._records)})"
            )
        record = self._records[layer]
        if isinstance(record, torch.Tensor):
            return record
        # Separate cache entries per grad mode: a no-grad read (metrics) must not hand a
        # graph-less tensor to a later loss.
        key = (layer, torch.is_grad_enabled() and record.needs_grad)
        if key not in self._cache:
            self._cache[key] = record.probs()
        return self._cache[key]
