"""DataLoaders the way every part of the toolkit builds them: workers that survive a stop signal, and the
per-rank shard of an evaluation set.

SLURM and torchrun stop a job by signalling the whole process group, DataLoader workers included. PyTorch's
workers die on a SIGTERM that does not come from their parent, and the main process then fails with "DataLoader
worker ... killed by signal" before it can save anything. Workers therefore ignore the stop signals: the main
process alone decides when to stop (engine/trainer.py saves a checkpoint first, and Ctrl-C works the same way),
and it shuts its workers down
through the DataLoader as usual; a worker whose parent has died exits by itself (PyTorch's watchdog).
"""

import atexit
import multiprocessing
import signal

import torch
from torch.utils.data import DataLoader, Dataset

from rs_transfer.engine.distributed import shard

# SLURM's and torchrun's stop signal, a common `#SBATCH --signal` choice, and Ctrl-C (sent to the whole foreground
# process group, workers included)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def _kill_remaining_workers() -> None:
    """At interpreter exit, SIGKILL daemonic children (DataLoader workers) still alive.

    multiprocessing's own exit handler stops them with SIGTERM, which our workers ignore, and then joins them:
    a loader whose iterator outlived the run (held by a traceback or a reference cycle) would hang the process at
    exit. atexit runs handlers last-registered first, so this runs before multiprocessing's.
    """
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


atexit.register(_kill_remaining_workers)


def ignore_stop_signals(worker_id: int | None = None) -> None:
    """A DataLoader `worker_init_fn`: this worker ignores SIGTERM, SIGUSR1 and SIGINT (runs after PyTorch installs
    its own worker handlers, which it replaces)."""
    for number in STOP_SIGNALS:
        signal.signal(number, signal.SIG_IGN)


def eval_loader(dataset: Dataset, batch_size: int, collate_fn=None, num_workers: int = 0,
                device: torch.device | None = None) -> DataLoader:
    """This rank's shard of an evaluation set (every sample exactly once over all ranks, no padding duplicates,
    which would bias the metric), in order, with stop-signal-proof workers and pinned memory for a CUDA device."""
    part = shard(dataset)
    return DataLoader(part, batch_size=batch_size, shuffle=False, collate_fn=collate_fn,
                      num_workers=min(num_workers, len(part)), worker_init_fn=ignore_stop_signals,
                      pin_memory=device is not None and torch.device(device).type == "cuda")
