"""The memory meter behind `log.plan=true` counts what a rank holds under FSDP2: a sharded
parameter (DTensor) is its local shard, half of the full tensor on 2 ranks (the DTensor's own
storage reports the full tensor)."""

from __future__ import annotations

import os

import torch
import torch.multiprocessing as mp
from conftest import free_port


def _rank(rank: int, port: int, out) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from oisd_lab.plan.trace import tensor_bytes

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 64, bias=False))
        full = tensor_bytes(model.parameters())
        fully_shard(model, mesh=init_device_mesh("cpu", (2,)))
        out[rank] = (full, tensor_bytes(model.parameters()))
    finally:
        dist.destroy_process_group()


def test_a_sharded_parameter_counts_its_local_shard():
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank, args=(free_port(), out), nprocs=2, join=True)
        got = dict(out)
    full = (64 * 32 + 32 + 32 * 64) * 4
    # every dim-0 size is even: each rank holds exactly half of each parameter
    assert got == {0: (full, full // 2), 1: (full, full // 2)}
