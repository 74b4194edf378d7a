"""Memory that a fake-tensor trace cannot see, as formulas (every number here is an estimate).

All sizes are bytes per device. `world` is the number of processes (devices) of the run.
"""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

CUDA_CONTEXT_BYTES = 600 * 2**20
"""CUDA context, cuBLAS and cuDNN workspaces of one process (outside `max_memory_allocated`)."""
NCCL_BYTES = 600 * 2**20
"""NCCL communicator buffers of a multi-GPU process (default channel and buffer sizes)."""
FRAGMENTATION = 0.10
"""Share of the allocated peak that the caching allocator reserves on top (fragmentation)."""


def precision_dtypes(precision: str, model_dtype: str) -> tuple[torch.dtype, torch.dtype | None]:
    """(parameter dtype, autocast dtype or None) of a Lightning precision and `model.dtype`.

    `*-true` casts the module to that dtype (no master copy); `*-mixed` keeps the parameters as
    loaded (float32 gives fp32 master weights) and runs forward under autocast.
    """
    true = {"32-true": torch.float32, "32": torch.float32, "bf16-true": torch.bfloat16,
            "16-true": torch.float16, "64-true": torch.float64}
    mixed = {"bf16-mixed": torch.bfloat16, "bf16": torch.bfloat16, "16-mixed": torch.float16, "16": torch.float16}
    if precision in true:
        return true[precision], None
    if precision in mixed:
        return DTYPES[model_dtype], mixed[precision]
    raise ValueError(f"precision: unknown value '{precision}'; use 32-true, bf16-true, bf16-mixed or 16-mixed")


def kv_cache_bytes(layers: int, kv_heads: int, head_dim: int, rows: int, tokens: int, dtype_bytes: int) -> int:
    """Keys and values of every layer for `rows` sequences of `tokens` positions:
    2 * layers * kv_heads * head_dim * rows * tokens * dtype_bytes."""
    return 2 * layers * kv_heads * head_dim * rows * tokens * dtype_bytes


def decode_step_bytes(layers: int, kv_heads: int, head_dim: int, rows: int, tokens: int, dtype_bytes: int,
                      vocab: int) -> int:
    """Transient memory of the last decoding step on top of the cache: the cache update
    concatenates one layer's keys and values into new tensors (one layer's cache twice), and the
    float32 next-token logits [rows, V] are copied by the temperature and softmax of sampling (x3)."""
    one_layer = kv_cache_bytes(1, kv_heads, head_dim, rows, tokens, dtype_bytes)
    return one_layer + 3 * rows * vocab * 4


def ddp_bucket_bytes(grad_bytes: int, world: int) -> int:
    """DDP keeps a flat copy of every gradient in its all-reduce buckets
    (`gradient_as_bucket_view=False`, the default); none with one process."""
    return grad_bytes if world > 1 else 0


def fsdp_shard(nbytes: int, world: int) -> int:
    """Bytes of one rank's shard under full sharding (padded to a multiple of the world size)."""
    return -(-nbytes // world)


FSDP_STEP_LAYERS = 2
"""Decoder layers gathered at once in the policy step under `strategy=fsdp`: the one computing
and, during backward, the one FSDP2 prefetches."""
FSDP_DIAGNOSTICS_LAYERS = 1
"""Decoder layers gathered at once in the diagnostics pass (a forward only, nothing prefetched)."""


def fsdp_gather_buffer_bytes(unit_params: int, world: int, dtype_bytes: int, cast: bool) -> int:
    """Transient bytes of gathering one FSDP2 unit on top of its unsharded parameters: the flat
    all-gather output (the whole unit, padded to the world size) and, when the compute dtype differs
    from the parameters' (mixed precision), this rank's shard cast to it as the all-gather input."""
    padded = -(-unit_params // world) * world
    return padded * dtype_bytes + (padded // world * dtype_bytes if cast else 0)


def fsdp_gathered_bytes(params: int, layer_params: int, layers: int, gathered_layers: int, dtype_bytes: int) -> int:
    """Bytes of the parameters gathered at once under per-layer FSDP2 (`sharding.py`): the root
    (all that is outside the decoder layers: embedding, final norm, unembedding; it stays gathered
    from its forward to its backward) plus `gathered_layers` decoder layers, in the compute dtype.
    params: the model's parameter count; layer_params: one decoder layer's."""
    root = params - layers * layer_params
    return (root + min(gathered_layers, layers) * layer_params) * dtype_bytes
