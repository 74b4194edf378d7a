"""One training step of the real code, run on fake tensors (or on real ones, to measure it).

The policy is built from its config inside `FakeTensorMode`: no weights, no memory, no compute.
The step is the module's own code (`OISDModule.accumulate_micro_batches`: per micro-batch the
loss terms, the gradient view's terms and the backward; `finish_gradient_view`; `clip_and_step`),
so the traced peak follows the code as it changes. `MemoryTrace` labels every allocation by the
part of the step that made it: the module's phases ("loss terms", "gradient view", "backward",
"optimizer step"; `OISDModule.phases`), and within them the policy forward, the logits, the
log-probs and each alignment loss.

Data-dependent answers (`.item()`, boolean indexing) are those of the planning rollout, whose
completions all run to `max_completion_length` (the worst case): every mask element is 1.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from .. import step
from ..losses import divergence
from ..registry import ALIGNMENT_CHANNELS
from .tracker import MemoryTrace

LABELS = {  # (module, function) -> the part of the step its allocations belong to
    ("losses.divergence", "chunked_logps"): "log-probs and entropy",
    ("losses.divergence", "entropy_from_logits"): "log-probs and entropy",
    ("losses.divergence", "_lens_jsd_rows"): "think loss (lens JSD)", ("step", "reference_logps"): "reference model",
}
"""A renamed function loses its label (its bytes count under "loss terms"); tests check the labels."""
CHANNEL_LABELS = {"think": "think loss (lens JSD)", "attn": "attention loss"}
"""Labels of the alignment channels' divergences (`registry.ALIGNMENT_CHANNELS`); any other
channel's is "<name> loss"."""
PHASE_LABELS = ("loss terms", "gradient view", "backward", "optimizer step")
"""The module's phases (`OISDModule.phases`) whose allocations the plan counts under their name."""


@dataclass
class Phase:
    """Peak bytes of one phase above the memory held before it, and the live bytes per label then."""

    peak: int = 0
    at_peak: dict[str, int] = field(default_factory=dict)
    during: tuple[str, ...] = ()
    """The labels open at the peak, outermost first: what the code was doing then (a peak inside
    "backward" is one of the backward pass)."""

    @classmethod
    def of(cls, trace: MemoryTrace, base: int = 0) -> Phase:
        return cls(trace.peak - base, {k: v for k, v in trace.at_peak.items() if v > 0}, trace.during)


class _AllOnesMode(MemoryTrace):
    """`MemoryTrace` that answers data-dependent questions as for an all-ones mask."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:
            return _one(args[0].dtype)
        if func in (torch.ops.aten.nonzero.default, torch.ops.aten.argwhere.default):
            x = args[0]
            return self._counted(torch.empty((x.numel(), x.dim()), dtype=torch.long, device=x.device))
        if func is torch.ops.aten.index.Tensor and any(_is_bool(i) for i in args[1]):
            return self.__torch_dispatch__(func, types, (args[0], _long_indices(args[1])), kwargs)
        if func is torch.ops.aten.masked_select.default:
            x = torch.broadcast_tensors(args[0], args[1])[0]
            return self._counted(torch.empty(x.numel(), dtype=args[0].dtype, device=args[0].device))
        return super().__torch_dispatch__(func, types, args, kwargs)

    def _counted(self, tensor):
        self._count(tensor)
        return tensor


def _one(dtype):
    return True if dtype == torch.bool else (1.0 if dtype.is_floating_point else 1)


def _is_bool(index) -> bool:
    return isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8)


def _long_indices(indices) -> list:
    """Boolean index tensors as the long indices of their (all-true) elements."""
    out = []
    for index in indices:
        if _is_bool(index):
            out.extend(_grid(index, d) for d in range(index.dim()))
        else:
            out.append(index)
    return out


def _grid(index: torch.Tensor, dim: int) -> torch.Tensor:
    """Long index along `dim` of every element of an all-true `index`, flattened."""
    shape = [1] * index.dim()
    shape[dim] = index.shape[dim]
    return torch.arange(index.shape[dim], device=index.device).reshape(shape).expand(index.shape).flatten()


@contextlib.contextmanager
def labelled(trace: MemoryTrace | None, policy):
    """Label allocations by part of the step: the policy forward, its logits, the loss functions
    of `step` and `losses`, each alignment channel's divergence; a gradient counts as "gradients" once accumulated into `.grad`."""
    if trace is None:
        yield
        return
    handles, saved = [], {}
    for module, name in ((policy, "policy forward (activations)"), (policy.get_output_embeddings(), "logits")):
        handles.append(module.register_forward_pre_hook(lambda *_, n=name: trace.labels.append(n)))
        handles.append(module.register_forward_hook(lambda *_: trace.labels.pop() and None))
    for p in policy.parameters():
        if p.requires_grad:
            handles.append(p.register_post_accumulate_grad_hook(lambda q: trace.relabel(q.grad, "gradients")))
    modules = {"losses.divergence": divergence, "step": step}
    for (module, fn), name in LABELS.items():
        if hasattr(modules[module], fn):
            saved[module, fn] = getattr(modules[module], fn)
            setattr(modules[module], fn, _with_label(trace, name, saved[module, fn]))
    channels = {name: ALIGNMENT_CHANNELS.entry(name) for name in ALIGNMENT_CHANNELS.names()}
    divergences = {name: entry.resolve() for name, entry in channels.items()}
    for name, entry in channels.items():  # the step finds a channel's divergence through its entry
        entry.target = _with_label(trace, CHANNEL_LABELS.get(name, f"{name} loss"), divergences[name])
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for (module, fn), original in saved.items():
            setattr(modules[module], fn, original)
        for name, entry in channels.items():
            entry.target = divergences[name]


def _with_label(trace, name, fn):
    def wrapper(*args, **kwargs):
        with trace.label(name):
            return fn(*args, **kwargs)

    return wrapper


def training_step(module, optimizer, parts, autocast, trace: MemoryTrace | None = None, view=None) -> None:
    """What `OISDModule.optimise` does to memory, by the module's own code: the micro-batches'
    loss terms and backward (`accumulate_micro_batches`), the gradient view's derived policy term
    (`finish_gradient_view`), clipping and the optimizer step (`clip_and_step`), with `trace`'s
    labels from the module's phases. `parts`: (rollout with its advantages, normalisers) per micro-batch,
    all with the whole step's normalisers. `view`: a logging step's gradient view
    (`module.gradient_view()`), which collects each term's gradient before the backward and
    derives the policy's after the last one, and is held through the optimizer step, as
    `OISDModule.optimise` does."""
    optimizer.zero_grad(set_to_none=True)
    phase_labels = module.phases.subscribed(lambda name: trace.label(name) if name in PHASE_LABELS else None) \
        if trace is not None else contextlib.nullcontext()
    with autocast(), labelled(trace, module.policy), phase_labels:
        module.accumulate_micro_batches([part for part, _ in parts], parts[0][1], backward=torch.Tensor.backward,
                                        view=view)
        module.finish_gradient_view(view)
        module.clip_and_step(optimizer)


def warm_optimizer(optimizer) -> int:
    """Take one step on zero gradients so the optimizer holds its state; returns the state's bytes."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return sum(_storage_bytes(v) for state in optimizer.state.values() for v in state.values())


def _storage_bytes(value) -> int:
    return value.untyped_storage().nbytes() if isinstance(value, torch.Tensor) else 0


def tensor_bytes(tensors) -> int:
    """Bytes of distinct storages (tied weights count once). A sharded tensor (FSDP2's DTensor
    parameters, their gradients and AdamW state) counts the shard this rank holds: the DTensor's
    own storage reports the full tensor."""
    from torch.distributed.tensor import DTensor

    seen = {}
    for t in tensors:
        if isinstance(t, DTensor):
            t = t._local_tensor
        seen[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
    return sum(seen.values())


@contextlib.contextmanager
def fake_mode():
    """Fake tensors for everything created inside; real tensors met there are faked too."""
    with FakeTensorMode(allow_non_fake_inputs=True):
        yield


def trace(fn, label: str = "other", policy=None) -> tuple[Phase, object]:
    """(peak of `fn()` above what was live before, its result) with the all-ones answers;
    allocations of `policy`'s forward are labelled as in a step."""
    mode = _AllOnesMode(label)
    with mode, labelled(mode, policy) if policy is not None else contextlib.nullcontext():
        result = fn()
    return Phase.of(mode), result


def trace_step(module, optimizer, parts, autocast, view=None) -> Phase:
    """Peak of a step whose micro-batches all look like `parts[0]`. The second micro-batch holds
    what the first left (the gradients, and on a logging step the gradient view's per-term sums),
    and every later one holds the same again, so two micro-batches give the peak of any number.
    `view`: trace a logging step with the gradient view."""
    mode = _AllOnesMode("loss terms")
    with mode:
        training_step(module, optimizer, parts[:1] * min(len(parts), 2), autocast, trace=mode, view=view)
    return Phase.of(mode)
