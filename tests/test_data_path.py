"""The CPU data path of issue 22: `data.num_workers: auto` from the machine, and the reduced-scale JPEG decode."""

import pytest

from rs_transfer.config import ConfigError, RunConfig, find_config, load_config
from rs_transfer.engine import distributed
from rs_transfer.engine.distributed import loader_workers


@pytest.fixture
def machine(monkeypatch):
    """Set this process's cores and the launcher's variables: machine(cores, **environment)."""
    def set_up(cores: int, **environment):
        monkeypatch.setattr(distributed.os, "sched_getaffinity", lambda pid: set(range(cores)))
        for key in ("LOCAL_WORLD_SIZE", "SLURM_STEP_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE"):
            monkeypatch.delenv(key, raising=False)
        for key, value in environment.items():
            monkeypatch.setenv(key, value)
    return set_up


@pytest.mark.parametrize("cores, environment, expected", [
    (2, {}, 1),  # this machine: one core for the trainer, one worker
    (1, {}, 0),  # a single core: loading in the training process, the one case of 0
    (112, {"LOCAL_WORLD_SIZE": "8"}, 13),  # a DGX H100's physical cores under torchrun: 14 per GPU less 1
    (224, {"SLURM_STEP_TASKS_PER_NODE": "8(x2)"}, 27),  # srun, two nodes of 8 tasks: the first count is per node
    (64, {"SLURM_NTASKS_PER_NODE": "4"}, 15),
    (8, {"LOCAL_WORLD_SIZE": "8"}, 1),  # a core per process: still one worker, never 0 silently
    (256, {}, distributed.MAX_AUTO_WORKERS),
])
def test_auto_workers_follow_the_cores_and_processes_of_the_node(machine, cores, environment, expected):
    machine(cores, **environment)
    workers, why = loader_workers("auto")
    assert workers == expected
    assert why.startswith(f"auto: {cores} cores / ")
    assert ("one core" in why) == (expected == 0)
    assert loader_workers(3) == (3, "data.num_workers")  # a count is taken as it is


def test_num_workers_takes_auto_and_the_gpu_recipes_use_it():
    assert load_config(RunConfig, None, ["data.num_workers=auto"]).data.num_workers == "auto"
    assert load_config(RunConfig, None, ["data.num_workers=6"]).data.num_workers == 6
    with pytest.raises(ConfigError, match=r"data.num_workers='autp' makes no sense here: it must be 'auto' or"):
        load_config(RunConfig, None, ["data.num_workers=autp"])
    for name in ("pretrain/recipe.yaml", "downstream/coco_det.yaml", "video/table6/01_baseline.yaml"):
        assert "num_workers: auto" in find_config(name).read_text()
