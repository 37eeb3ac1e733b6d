"""Launcher environments and the single-process behaviour of the collective helpers."""

import pytest
import torch

from rs_transfer.engine import distributed


@pytest.fixture
def clean_env(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "MASTER_ADDR",
                "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def test_launcher_env_reads_torchrun_then_slurm(clean_env):
    assert distributed.launcher_env() == (0, 1, 0)
    clean_env.setenv("SLURM_PROCID", "5")
    clean_env.setenv("SLURM_NTASKS", "8")
    clean_env.setenv("SLURM_LOCALID", "1")
    assert distributed.launcher_env() == (5, 8, 1)
    clean_env.setenv("RANK", "3")  # torchrun inside a SLURM allocation: torchrun's variables win
    clean_env.setenv("WORLD_SIZE", "4")
    clean_env.setenv("LOCAL_RANK", "3")
    assert distributed.launcher_env() == (3, 4, 3)


def test_one_slurm_task_is_one_process(clean_env):
    clean_env.setenv("SLURM_PROCID", "0")
    clean_env.setenv("SLURM_NTASKS", "1")
    assert distributed.launcher_env() == (0, 1, 0)


def test_many_slurm_tasks_without_a_rendezvous_address_is_a_clear_error(clean_env):
    clean_env.setenv("SLURM_PROCID", "0")
    clean_env.setenv("SLURM_NTASKS", "2")
    with pytest.raises(distributed.DistributedError, match="MASTER_ADDR and MASTER_PORT not set"):
        distributed.init_distributed("cpu")


def test_bad_device_names_the_key(clean_env):
    with pytest.raises(distributed.DistributedError, match="train.device"):
        distributed.init_distributed("tpu")


def test_single_process_collectives_are_identities(clean_env):
    info = distributed.init_distributed("cpu")
    assert (info.rank, info.world_size, info.device) == (0, 1, torch.device("cpu"))
    assert distributed.is_main() and distributed.get_world_size() == 1
    confusion = torch.eye(3)
    summed = distributed.all_reduce_sum(confusion)
    assert torch.equal(summed, confusion) and summed is not confusion
    assert distributed.all_gather_object({"a": 1}) == [{"a": 1}]
    assert distributed.broadcast_object(7) == 7
    data = list(range(5))
    assert distributed.shard(data) is data
