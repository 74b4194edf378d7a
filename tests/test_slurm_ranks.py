"""Ranks under a simulated SLURM multi-node launch (`srun` with 2 nodes x 2 tasks; this process is
task 3: the second task of the second node). The Trainer is built as `oisd-lab train` builds it
(`compose` of the command-line overrides, the preflight's runtime check, `make_trainer`); no
process is started and no process group is created."""

from __future__ import annotations

import pytest
from conftest import tiny_overrides

SLURM = {"SLURM_NNODES": "2", "SLURM_NTASKS": "4", "SLURM_NTASKS_PER_NODE": "2", "SLURM_PROCID": "3",
         "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_JOB_ID": "812345", "SLURM_NODELIST": "gpu[07-08]",
         "SLURM_JOB_NAME": "oisd-train"}
LAUNCHERS = ("RANK", "LOCAL_RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE", "WORLD_SIZE", "NODE_RANK", "MASTER_ADDR",
             "MASTER_PORT", "TORCHELASTIC_RUN_ID")


@pytest.fixture()
def slurm(monkeypatch):
    for name in LAUNCHERS:
        monkeypatch.delenv(name, raising=False)
    for name, value in SLURM.items():
        monkeypatch.setenv(name, value)


def _cfg(tmp_path, *extra):
    from oisd_lab.config import compose

    return compose(tiny_overrides(tmp_path / "run", "accelerator=cpu", "devices=2", *extra))


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_ranks_come_from_slurm(slurm, strategy, tmp_path):
    from lightning.fabric.plugins.environments import SLURMEnvironment

    from oisd_lab.preflight import check_runtime
    from oisd_lab.run.folder import RunDir
    from oisd_lab.run.trainer import launched_rank, make_trainer
    from oisd_lab.sharding import ShardedStrategy

    cfg = _cfg(tmp_path, "num_nodes=2", f"strategy={strategy}")
    check_runtime(cfg)
    trainer = make_trainer(cfg, RunDir(tmp_path / "run"), loggers=[])
    assert isinstance(trainer.strategy.cluster_environment, SLURMEnvironment)
    assert isinstance(trainer.strategy, ShardedStrategy) == (strategy == "fsdp")
    assert (trainer.global_rank, trainer.world_size, trainer.local_rank, trainer.node_rank) == (3, 4, 1, 1)
    assert (trainer.num_nodes, trainer.num_devices) == (2, 2)
    # the strategy's own world (FSDP's data-parallel mesh, DDP's sampler) is the process group's
    assert trainer.strategy.num_nodes * trainer.strategy.num_processes == 4
    # srun started the 4 tasks: Lightning's launcher (DDP) or none (FSDP) starts no process of its own
    assert trainer.strategy.cluster_environment.creates_processes_externally
    assert launched_rank() == 3  # rank-0-only work (evaluation before RL, the plan) is skipped on this task
    env = trainer.strategy.cluster_environment
    assert (env.main_address, env.main_port) == ("gpu07", 15000 + 2345)


def test_rank_zero_of_the_job(slurm, monkeypatch, tmp_path):
    from oisd_lab.run.folder import RunDir
    from oisd_lab.run.trainer import launched_rank, make_trainer

    for name, value in {"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}.items():
        monkeypatch.setenv(name, value)
    trainer = make_trainer(_cfg(tmp_path, "num_nodes=2", "strategy=fsdp"), RunDir(tmp_path / "run"), loggers=[])
    assert (trainer.global_rank, trainer.world_size, trainer.local_rank, trainer.node_rank) == (0, 4, 0, 0)
    assert launched_rank() == 0


@pytest.mark.parametrize("extra, message", [
    (["num_nodes=1"], "num_nodes: 1 but SLURM allocated 2 nodes (--nodes=2); pass num_nodes=2"),
    (["num_nodes=2", "devices=4"], "devices: 4 but SLURM starts 2 tasks per node (--ntasks-per-node=2); pass devices=2"),
    (["num_nodes=0"], "num_nodes: must be a whole number of nodes >= 1, got 0; use num_nodes=1 on one machine"),
])
def test_a_launch_that_disagrees_with_slurm_is_one_line_error(slurm, extra, message, tmp_path):
    """Without the check a task would build a 2-rank mesh in a 4-rank process group and hang."""
    from oisd_lab.errors import ConfigError
    from oisd_lab.preflight import check_runtime

    with pytest.raises(ConfigError) as err:
        check_runtime(_cfg(tmp_path, "strategy=fsdp", *extra))
    assert str(err.value) == message


def test_interactive_allocation_is_not_a_launch(slurm, monkeypatch, tmp_path):
    """Inside `salloc` (job name bash/interactive) SLURM's variables do not make ranks: Lightning
    starts the ranks itself and this process is rank 0 of a one-node run."""
    from oisd_lab.preflight import check_runtime
    from oisd_lab.run.folder import RunDir
    from oisd_lab.run.trainer import launched_rank, make_trainer

    monkeypatch.setenv("SLURM_JOB_NAME", "interactive")
    cfg = _cfg(tmp_path, "strategy=fsdp")
    check_runtime(cfg)
    trainer = make_trainer(cfg, RunDir(tmp_path / "run"), loggers=[])
    assert (trainer.global_rank, trainer.world_size, trainer.num_nodes) == (0, 2, 1)
    assert launched_rank() == 0
