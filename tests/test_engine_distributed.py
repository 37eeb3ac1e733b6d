"""Launcher environments and the single-process behaviour of the collective helpers."""

import pytest
import torch

from rs_transfer.engine import distributed


@pytest.fixture
def clean_env(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "MASTER_ADDR",
                "MASTER_PORT", "SLURM_STEP_NUM_TASKS", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def test_launcher_env_reads_torchrun_then_slurm(clean_env):
    assert distributed.launcher_env() == (0, 1, 0)
    clean_env.setenv("SLURM_PROCID", "5")
    clean_env.setenv("SLURM_NTASKS", "8")
    clean_env.setenv("SLURM_STEP_NUM_TASKS", "8")  # srun started the 8 tasks
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
    clean_env.setenv("SLURM_STEP_NUM_TASKS", "2")
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
    assert distributed.all_gather_list((1, 2)) == [1, 2]
    assert distributed.broadcast_object(7) == 7
    data = list(range(5))
    assert distributed.shard(data) is data


def test_shard_gives_each_rank_a_contiguous_part_and_every_item_once(monkeypatch):
    # What the evaluators rely on: concatenated in rank order (all_gather_list), the parts are the dataset in order.
    monkeypatch.setattr(distributed, "get_world_size", lambda: 3)
    parts = []
    for rank in range(3):
        monkeypatch.setattr(distributed, "get_rank", lambda: rank)
        parts.append(list(distributed.shard(list(range(7)))))
    assert parts == [[0, 1], [2, 3], [4, 5, 6]]
    assert [distributed.rank_range(r, 3, 22) for r in range(3)] == [range(0, 7), range(7, 14), range(14, 22)]


@pytest.mark.parametrize("env", [{"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"},
                                 {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2",
                                  "SLURM_LOCALID": "1"}])
def test_write_once_leaves_the_writing_to_local_rank_0_under_either_launcher(clean_env, monkeypatch, tmp_path, env):
    from rs_transfer.engine.write_once import write_once
    from rs_transfer.errors import UserError

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(UserError, match="waited 0 s for local rank 0"):
        write_once(tmp_path / "data", lambda folder: pytest.fail("local rank 1 wrote the dataset"), timeout_s=0)
    assert not (tmp_path / "data").exists()


def test_slurm_tasks_that_srun_did_not_start_are_an_error_at_once_not_a_30_minute_hang(clean_env, caplog):
    # `python -m rs_transfer ...` typed in an `sbatch --ntasks 2` script or an `salloc -n 2` shell: SLURM says two
    # tasks, one process runs; joining a group of two would wait for the other until the timeout
    clean_env.setenv("SLURM_PROCID", "0")
    clean_env.setenv("SLURM_NTASKS", "2")
    clean_env.setenv("MASTER_ADDR", "localhost")
    clean_env.setenv("MASTER_PORT", "29500")
    with pytest.raises(distributed.DistributedError, match="SLURM_NTASKS=2, but this process was not started by srun"
                                                          ".*prefix it with `srun`"):
        distributed.init_distributed("cpu")
    clean_env.setenv("SLURM_STEP_NUM_TASKS", "1")  # `srun -n 1` inside the allocation: one process, on purpose
    assert distributed.launcher_env() == (0, 1, 0)
    assert "srun started this one process alone" in caplog.text


@pytest.mark.parametrize("local_rank, visible, index", [(3, 8, 3), (3, 1, 0), (0, 1, 0), (0, 8, 0)])
def test_each_rank_takes_its_local_gpu_or_the_only_one_it_sees(local_rank, visible, index):
    # srun --gpus-per-task 1 shows each task one GPU (index 0) whatever its SLURM_LOCALID; torchrun shows all
    assert distributed.cuda_index(local_rank, visible) == index


def test_more_local_ranks_than_visible_gpus_is_an_error_naming_both():
    with pytest.raises(distributed.DistributedError, match="local rank 5 but only 4 GPUs visible"):
        distributed.cuda_index(5, 4)


def test_the_cuda_device_set_is_the_visible_one_under_one_gpu_per_task(clean_env, monkeypatch):
    set_to = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", set_to.append)
    clean_env.setenv("RANK", "0")
    clean_env.setenv("WORLD_SIZE", "1")
    clean_env.setenv("LOCAL_RANK", "3")  # as SLURM_LOCALID would be on a node's fourth task
    info = distributed.init_distributed("cuda")
    assert info.device == torch.device("cuda", 0) and set_to == [torch.device("cuda", 0)]
