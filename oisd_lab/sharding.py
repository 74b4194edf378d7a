"""Sharded training: FSDP2 (`torch.distributed.fsdp.fully_shard`) through Lightning's
`ModelParallelStrategy`, on GPUs (NCCL) and on CPU ranks (gloo).

`strategy=fsdp` shards every decoder layer and then the root (embedding, final norm, unembedding)
over all ranks as one data-parallel mesh; a layer's parameters are gathered for its forward and
backward and freed after. Under `precision=bf16-mixed` compute runs in bf16 while the master
weights, the optimizer state and the gradient reduction stay float32. FSDP1
(`FullyShardedDataParallel`, Lightning's `FSDPStrategy`) is not offered: FSDP2 is the path torch,
accelerate and verl maintain, its DTensor parameters work with `clip_grad_norm_` and
`torch.distributed.checkpoint` as they are, and it runs on CPU ranks, which FSDP1 under Lightning
refuses.

Decoding (`rollout.generate`) runs inside `training_step` with the policy's parameters gathered
once per rollout (`gathered`): every unit is unsharded before the first token and resharded after
the last, so a rollout costs one all-gather of the model and holds the full parameters for its
duration, instead of one all-gather per layer per generated token. On logging steps with the
gradient view (`log.gradient_view`) the step itself runs inside `gathered(policy,
through_backward=True)`: the view differentiates each loss term w.r.t. the gathered parameters.
Checkpoints are full files (`ShardedStrategy`). `oisd-lab plan` counts the parameters gathered at
once as this module gathers them (`plan/formulas.py`, `fsdp_gathered_bytes`).
"""

from __future__ import annotations

import contextlib
import time

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter

from . import anatomy


def decoder_layers(policy) -> list[torch.nn.Module]:
    """The policy's decoder blocks (the units sharded one by one)."""
    try:
        return list(anatomy.decoder_layers(policy))
    except ValueError:
        raise ValueError("strategy: fsdp needs a decoder with a list of decoder layers (`.model.layers`); "
                         "use strategy=ddp for this model") from None


def shard(policy, mesh, bf16: bool) -> None:
    """Apply `fully_shard` to each decoder layer, then to the root."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs = {"mesh": mesh}
    if bf16:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in decoder_layers(policy):
        fully_shard(layer, **kwargs)
    # the root (embedding, final norm, unembedding) stays gathered from its forward to its backward:
    # the logit lens and the closed-form lens gradient call norm and lm_head outside the root forward
    fully_shard(policy, reshard_after_forward=False, **kwargs)
    if mesh.device_type == "cpu":
        reduce_scatter = InPlaceReduceScatter()
        for unit in fsdp_units(policy):
            unit.set_custom_reduce_scatter(reduce_scatter)


def _released(fn, *tensors, timeout_s: float = 1.0) -> None:
    """`fn` on flat views of `tensors`, returning once gloo's worker thread has let go of them.

    A gloo collective's work (run by a worker thread) holds its tensors and is dropped by that
    thread after it has woken the caller. When the caller drops the last other reference first (FSDP
    frees its communication buffers right after the call), the tensor is freed on the worker
    thread. The memory profiler's accounting is per thread (`log.plan`'s measured peaks on CPU):
    it records the allocation and not that free, and counts the buffer as live for the rest of the
    phase, on some runs and not others. The views handed to gloo count on their storages while gloo
    holds them, so waiting for the counts to fall back leaves every free to the calling thread."""
    storages = [t.untyped_storage() for t in tensors]
    held = [torch._C._storage_Use_Count(s._cdata) for s in storages]
    views = [t.view(-1) for t in tensors]
    fn(*views)
    del views
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(
            torch._C._storage_Use_Count(s._cdata) > n for s, n in zip(storages, held, strict=True)):
        time.sleep(1e-5)  # the worker is past the collective: it drops its work next


class InPlaceReduceScatter(ReduceScatter):
    """FSDP2's gradient reduce-scatter on CPU ranks (gloo), as gloo computes it, without gloo's copy.

    Gloo has no reduce-scatter: it clones the input (a float32 copy of the unit's unsharded
    gradients) on the calling thread, all-reduces the clone on its worker thread and copies this
    rank's chunk out; the clone's last reference is often the worker's, so it is freed there,
    unseen by the memory profiler (`_released`; the root's clone is 4 x vocabulary x width bytes).
    Here the input, FSDP's own reduce-scatter buffer, which it only keeps alive after the call, is
    all-reduced in place and this rank's chunk copied out: the same all-reduce with the same op as
    gloo's, so the same sum, with one buffer fewer."""

    def allocate(self, size, *, dtype, device):
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, op, async_op: bool = False):
        import torch.distributed as dist

        def reduce(flat):
            dist.all_reduce(flat, op=op, group=group)
            output_tensor.copy_(flat.view(group.size(), -1)[group.rank()].view_as(output_tensor))

        _released(reduce, input_tensor)
        return None


def fsdp_units(policy) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in policy.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def gathered(policy, through_backward: bool = False):
    """Full parameters on every rank for the duration (a rollout, or calls into submodules outside
    the root forward). through_backward: also kept through backward passes, resharded on exit (the
    gradient view: its extra backward passes and the step's own all read the gathered weights).
    Inside, `policy.parameters()` are the gathered parameters autograd differentiates. A no-op for
    an unsharded policy."""
    units = fsdp_units(policy)
    if not units:
        yield
        return
    order = _ForwardOrder(units)
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        if through_backward:
            unit.set_reshard_after_backward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        if not through_backward:
            order.forget_since_entry()
        for unit in units:
            root = unit is policy  # the root stays gathered from its forward to its backward
            if through_backward:
                unit.set_reshard_after_backward(True, recurse=False)
            if root and not through_backward:
                continue
            unit.reshard()
            unit.set_reshard_after_forward(not root, recurse=False)


class _ForwardOrder:
    """FSDP2 records every forward of a unit (grad or not) to choose which unit to prefetch in the
    next backward: the unit that ran before it. Forwards inside `gathered` without a backward (a
    rollout, whose length differs between ranks, or rank 0's logging pass) would make the ranks
    prefetch different units, and their collectives then pair an all-gather on one rank with a
    reduce-scatter on the other: a deadlock at the step's first backward. Dropping those records
    leaves every rank with the forwards of the step alone."""

    def __init__(self, units: list) -> None:
        self.groups = [g for unit in units for g in getattr(unit._get_fsdp_state(), "_fsdp_param_groups", [])]
        self.ctx = self.groups[0].comm_ctx if self.groups else None
        # the list exists once the root's first forward has initialised FSDP
        self.order = len(getattr(self.ctx, "post_forward_order", []))
        self.indices = [len(g._post_forward_indices) for g in self.groups]

    def forget_since_entry(self) -> None:
        if self.ctx is None or not hasattr(self.ctx, "post_forward_order"):
            return
        del self.ctx.post_forward_order[self.order:]
        for group, n in zip(self.groups, self.indices, strict=True):
            del group._post_forward_indices[n:]


class ShardedStrategy(ModelParallelStrategy):
    """FSDP2 over all ranks (data parallel only): `OISDModule.configure_model` calls `parallelize`.

    Checkpoints are full: every rank joins the gather, rank 0 writes one file through the run's
    `AtomicCheckpointIO` (atomic, digest, finite parameters) with the same keys as a DDP or
    single-device checkpoint, and `find_resumable` picks it as any other. Resuming loads it into
    the shards (each rank reads the file memory-mapped; parameters and AdamW state are broadcast
    from rank 0). The cost: rank 0 holds the full parameters and optimizer state in CPU memory
    while it saves."""

    strategy_name = "oisd_fsdp2"

    def __init__(self) -> None:
        super().__init__(save_distributed_checkpoint=False)

    def setup_environment(self) -> None:
        world = self.num_nodes * self.num_processes
        self._data_parallel_size, self._tensor_parallel_size = world, 1
        super().setup_environment()

    def parallelize(self, policy) -> None:
        if fsdp_units(policy):
            return
        bf16 = str(self.precision_plugin.precision).startswith("bf16")
        shard(policy, self.device_mesh["data_parallel"], bf16)


def make_strategy(name: str):
    """The Lightning strategy for `strategy`: `fsdp` is FSDP2 (`ShardedStrategy`), others pass through."""
    if name == "fsdp":
        return ShardedStrategy()
    return name
