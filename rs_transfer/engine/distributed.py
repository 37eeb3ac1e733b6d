"""Processes, devices and collectives: what the trainer and the evaluators share.

One process is the special case of many: with no launcher environment this is rank 0 of 1 and every
collective below returns its input. Under `torchrun` (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) or
`srun` (SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID, with MASTER_ADDR/PORT exported by the job script) the
default process group is created once: NCCL on GPU, gloo on CPU.

Evaluators use `shard(dataset)` (or `loader.eval_loader`, which calls it) to split their data over ranks in
contiguous parts (no padding, so no sample counts twice), sum their statistics with `all_reduce_sum` or gather
per-item results with `all_gather_list`, and get the same metrics on every rank. Batches reach the device
through device.py.
"""

import atexit
import datetime
import functools
import logging
import os
import random
import re
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Subset

from rs_transfer.errors import UserError
from rs_transfer.files import folder_lock

log = logging.getLogger(__name__)


class DistributedError(UserError):
    pass


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def launcher_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's variables, else SLURM's, else (0, 1, 0).

    SLURM: the processes started are srun's step (SLURM_STEP_NUM_TASKS), not the allocation (SLURM_NTASKS, also
    set in an sbatch script or an salloc shell, where no srun started the other tasks: joining a group of
    SLURM_NTASKS there waits for processes that never come, until the 30-minute timeout). Raises DistributedError
    when the allocation has several tasks and no srun started this process; a step of one task under a bigger
    allocation (`srun -n 1`) is one process, with a warning."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    allocated = int(os.environ.get("SLURM_NTASKS", 1))
    if allocated <= 1:
        return 0, 1, 0
    if "SLURM_STEP_NUM_TASKS" not in os.environ:
        raise DistributedError(
            f"SLURM_NTASKS={allocated}, but this process was not started by srun (no SLURM_STEP_NUM_TASKS: an sbatch "
            "script or an salloc shell runs the command once): prefix it with `srun` to start one process per task, "
            "run it under torchrun, or ask SLURM for one task")
    started = int(os.environ["SLURM_STEP_NUM_TASKS"])
    if started == 1:
        _warn_once(f"SLURM allocated {allocated} tasks but srun started this one process alone "
                   "(SLURM_STEP_NUM_TASKS=1): training on one process")
        return 0, 1, 0
    return int(os.environ["SLURM_PROCID"]), started, int(os.environ.get("SLURM_LOCALID", 0))


@functools.cache
def _warn_once(message: str) -> None:
    """A launcher warning said once per process, however often the environment is read."""
    log.warning("%s", message)


def elastic_restart() -> int:
    """How many times torchrun (`--max-restarts`) has restarted the worker group: 0 on the first start. A restarted
    group continues from its checkpoints (the trainer resumes by itself), instead of refusing them."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))


def restarted_group_store(world_size: int, timeout: datetime.timedelta):
    """The rendezvous store of a worker group that torchrun restarted (`--max-restarts`), or None on a first start
    (env://, as torchrun sets it up).

    torchrun's agent keeps one store for all its restarts, and the failed group's keys are still in it: a restarted
    rank reads the address its dead peer published and waits in gloo's connectFullMesh until the timeout (torch
    2.14, a rank SIGKILLed during a collective; NCCL's unique id is kept under a key of the same kind). Each restart
    therefore uses its own key prefix in the agent's store."""
    restart = elastic_restart()
    if restart == 0 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None  # without the agent's store, rank 0 hosts a new store for every start
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False,
                          timeout=timeout)
    return dist.PrefixStore(f"rs_transfer/restart_{restart}", store)


def cuda_index(local_rank: int, visible: int) -> int:
    """The CUDA device of the process with `local_rank` on its node, among the `visible` ones it sees.

    torchrun and `srun --gpus-per-node` show every process all the node's GPUs: take the local rank's. SLURM with
    one GPU per task (`--gpus-per-task 1`, or CUDA_VISIBLE_DEVICES per rank) shows each process only its own: take
    it, whatever the local rank. Raises DistributedError when several GPUs are visible but fewer than the local
    ranks."""
    if visible == 1:
        return 0
    if local_rank >= visible:
        raise DistributedError(f"local rank {local_rank} but only {visible} GPUs visible to it: start at most {visible} "
                               "processes per node, or one GPU per task (srun --gpus-per-task 1)")
    return local_rank


def init_distributed(device: str = "auto") -> DistInfo:
    """Pick this process's device and join the process group (once; later calls return the same)."""
    rank, world_size, local_rank = launcher_env()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise DistributedError("train.device=cuda but CUDA is not available; use train.device=auto or cpu")
        torch_device = torch.device("cuda", cuda_index(local_rank, torch.cuda.device_count()))
        torch.cuda.set_device(torch_device)
    elif device == "cpu":
        torch_device = torch.device("cpu")
    else:
        raise DistributedError(f"train.device must be auto, cpu or cuda, not {device!r}")
    if world_size > 1 and not dist.is_initialized():
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise DistributedError(
                f"{world_size} processes but {' and '.join(missing)} not set: launch with torchrun, or export "
                "MASTER_ADDR (first node's host name) and MASTER_PORT in the SLURM job script"
            )
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("WORLD_SIZE", str(world_size))
        backend = "nccl" if torch_device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(minutes=30)
        dist.init_process_group(
            backend, rank=rank, world_size=world_size, timeout=timeout,
            device_id=torch_device if backend == "nccl" else None, store=restarted_group_store(world_size, timeout),
        )
        # Destroy the group before the interpreter exits: gloo's threads torn down during interpreter shutdown
        # abort the process ("terminate called without an active exception"), seen on 2-process CPU runs.
        atexit.register(cleanup)
    return DistInfo(rank, world_size, local_rank, torch_device)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over ranks (a new tensor; the input is left alone). Confusion matrices, counts, sums of losses."""
    return _all_reduce(tensor, dist.ReduceOp.SUM)


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """The maximum over ranks (a new tensor): flags any rank raised, such as a NaN loss or a stop signal."""
    return _all_reduce(tensor, dist.ReduceOp.MAX)


def _all_reduce(tensor: torch.Tensor, op) -> torch.Tensor:
    tensor = tensor.clone()
    if is_distributed():
        dist.all_reduce(tensor, op=op)
    return tensor


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Give every rank rank 0's buffers (BN running statistics).

    DDP broadcasts buffers only at the start of a forward, so after the last training step each rank holds
    statistics updated by its own batch; without this, ranks would evaluate different networks, none of them
    quite the one rank 0 saves.
    """
    if is_distributed():
        for buffer in module.buffers():
            dist.broadcast(buffer, src)


def all_gather_object(obj) -> list:
    """Every rank's `obj`, in rank order (picklable objects; for small things such as per-image results)."""
    if not is_distributed():
        return [obj]
    gathered = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def all_gather_list(items) -> list:
    """Every rank's `items`, concatenated in rank order (per-image results of an evaluation: with `shard`'s
    contiguous parts, this is the order one process would have produced)."""
    return [item for part in all_gather_object(list(items)) for item in part]


def broadcast_object(obj):
    """Rank 0's `obj` on every rank (what the other ranks pass is ignored)."""
    if not is_distributed():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


@contextmanager
def claimed_folder(folder: str | Path, what: str):
    """For the with-block, rank 0 holds `folder`'s lock (files.folder_lock: one live job per folder, released by the
    OS however the holder dies). When another live process holds it (FolderInUseError, naming the folder and the
    holder) or the folder cannot be made (FileWriteError), every rank raises rank 0's error: all ranks stop, none
    waits at a later collective."""
    with ExitStack() as held:
        problem = None
        if get_rank() == 0:
            try:
                held.enter_context(folder_lock(folder, what))
            except UserError as error:
                problem = error
        problem = broadcast_object(problem)
        if problem is not None:
            raise problem
        yield


def rank_range(rank: int, world: int, count: int) -> range:
    """The items rank `rank` of `world` takes of `count`: a contiguous range (r * N // W up to (r + 1) * N // W), so
    tar shards are read by one rank each; together the ranks take each item once, with no padding."""
    return range(rank * count // world, (rank + 1) * count // world)


def shard(dataset: Dataset) -> Dataset:
    """This rank's part of an evaluation set (`rank_range` of its items)."""
    world = get_world_size()
    if world == 1:
        return dataset
    return Subset(dataset, rank_range(get_rank(), world, len(dataset)))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class StepFlags:
    """Flags each rank raises on its own (a stop signal), agreed over ranks at every step
    without waiting on the device: posted after step t as an all-reduce (max) on a CPU gloo group of their own,
    read after step t + 1, so every rank acts on the same values at the same step, one step after they were raised.
    In one process the flags are their own agreement, at once.

    `close()` waits for the last reduction; every rank must call `agree` at the same steps (the training loop does).
    """

    def __init__(self):
        self.pending = None
        # A group of its own, also when the default one is gloo: its reductions never queue behind DDP's.
        self.group = dist.new_group(backend="gloo") if is_distributed() else None

    def agree(self, flags: list) -> list:
        """Post `flags` (floats); return the flags agreed at the previous call (all 0 at the first call)."""
        if self.group is None:
            return list(flags)
        agreed = [0.0] * len(flags)
        if self.pending is not None:
            work, posted = self.pending
            work.wait()
            agreed = posted.tolist()
        posted = torch.tensor(flags, dtype=torch.float32)
        self.pending = (dist.all_reduce(posted, op=dist.ReduceOp.MAX, group=self.group, async_op=True), posted)
        return agreed

    def close(self, timeout_s: float = 60) -> None:
        """Wait for the last reduction (a rank that failed before posting it makes this give up after `timeout_s`:
        the run is ending with that failure anyway)."""
        if self.pending is not None:
            work, self.pending = self.pending[0], None
            try:
                work.wait(datetime.timedelta(seconds=timeout_s))
            except RuntimeError:
                pass


def cpu_threads(local_world_size: int) -> tuple:
    """(intra-op threads, why) for a process that computes on the CPU: OMP_NUM_THREADS when set (torchrun sets 1
    for several processes); else this process's share of the cores it may use, less the 1-minute load average
    that other work puts on them at start, at least 1. torch's default, one thread per core, oversubscribes a busy
    machine: the demo on a 2-core machine with other work ran at 0.3-1 img/s with 2 threads, 24 img/s with one."""
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads(), "OMP_NUM_THREADS"
    cores = len(os.sched_getaffinity(0))
    load = os.getloadavg()[0]
    free = int(cores - load + 0.5)
    threads = max(1, min(cores, free) // max(1, local_world_size))
    return threads, f"{cores} cores, load average {load:.1f} at start; OMP_NUM_THREADS=N chooses"


# Cores each training process keeps for itself when `data.num_workers: auto` sizes its loader: the main process
# launches the GPU kernels, runs the collate/pin-memory thread and the Python of the step (PyTorch's DataLoader
# docs and timm's train.py leave the same one core per process).
TRAINER_CORES = 1
# More workers than this per process only hold memory (each keeps prefetch_factor batches and a copy of the
# dataset's index): 3.9k img/s per GPU at ~400 img/s per worker-core (docs/benchmarks.md) needs ~10.
MAX_AUTO_WORKERS = 32


def local_processes() -> int:
    """Training processes on this node: torchrun's LOCAL_WORLD_SIZE, else srun's SLURM_STEP_TASKS_PER_NODE (its
    first count, "8(x2)" -> 8), else SLURM_NTASKS_PER_NODE, else 1."""
    for key in ("LOCAL_WORLD_SIZE", "SLURM_STEP_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE"):
        found = re.match(r"\s*(\d+)", os.environ.get(key, ""))
        if found and int(found.group(1)) > 0:
            return int(found.group(1))
    return 1


def loader_workers(setting: int | str) -> tuple:
    """(DataLoader worker processes, why) for `data.num_workers`: an int is taken as it is; "auto" is this
    process's share of the cores it may use (os.sched_getaffinity, so taskset, cgroups' cpusets and SLURM's
    --cpus-per-task count) over the training processes of this node (`local_processes`), less TRAINER_CORES for
    the process itself, capped at MAX_AUTO_WORKERS and at least 1 wherever there are 2 cores or more (0, loading in
    the training process, only on a single core, and the reason says so). Raises ValueError for any other string
    (config validation refuses it first)."""
    if not isinstance(setting, str):
        return setting, "data.num_workers"
    if setting != "auto":
        raise ValueError(f"data.num_workers must be an integer or 'auto', not {setting!r}")
    cores, processes = len(os.sched_getaffinity(0)), local_processes()
    share = cores // processes
    workers = min(MAX_AUTO_WORKERS, max(share - TRAINER_CORES, 1 if cores > 1 else 0))
    why = f"auto: {cores} cores / {processes} process(es) on this node - {TRAINER_CORES} for the trainer"
    if workers == 0:
        why += "; one core: loading in the training process"
    elif share - TRAINER_CORES > MAX_AUTO_WORKERS:
        why += f", at most {MAX_AUTO_WORKERS}"
    return workers, why
