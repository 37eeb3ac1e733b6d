"""DataLoaders the way every part of the toolkit builds them: workers that survive a stop signal, and the
per-rank shard of an evaluation set (`eval_loader`; `eval_batches` for images of many sizes).

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
import threading
from contextlib import contextmanager

import torch
from torch.utils.data import DataLoader, Dataset

from rs_transfer.engine.distributed import loader_workers, shard

# SLURM's and torchrun's stop signal, a common `#SBATCH --signal` choice, and Ctrl-C (sent to the whole foreground
# process group, workers included)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


@contextmanager
def stop_signals_handled(handler):
    """Run the body with `handler(number, frame)` for STOP_SIGNALS, then put the previous handlers back. Handlers
    can only be installed in the main thread: elsewhere nothing changes."""
    handled = STOP_SIGNALS if threading.current_thread() is threading.main_thread() else ()
    previous = {number: signal.signal(number, handler) for number in handled}
    try:
        yield
    finally:
        for number, old in previous.items():
            signal.signal(number, old)


class StopFlag:
    """A signal handler that notes the name of the last stop signal received (`signalled`, None before any)."""

    def __init__(self):
        self.signalled: str | None = None

    def __call__(self, number, frame) -> None:
        self.signalled = signal.Signals(number).name


@contextmanager
def stop_signals_recorded():
    """Note stop signals in a StopFlag instead of dying, so the work in hand can finish and be saved."""
    flag = StopFlag()
    with stop_signals_handled(flag):
        yield flag


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
    its own worker handlers, which it replaces), then takes the signals that `Loader` blocked while it started:
    one sent in between was held pending and is now discarded."""
    for number in STOP_SIGNALS:
        signal.signal(number, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


class Loader(DataLoader):
    """A DataLoader whose workers cannot be killed by a stop signal, not even one sent while they start.

    Between a worker's fork and its `worker_init_fn`, PyTorch's own handler kills it on a SIGTERM that does not
    come from its parent; so the stop signals are blocked while the workers start (children inherit the mask),
    and `ignore_stop_signals` (the default `worker_init_fn`) ignores, then unblocks them. The main process gets a
    signal sent meanwhile when the workers have started.
    """

    def __init__(self, *args, worker_init_fn=ignore_stop_signals, **kwargs):
        super().__init__(*args, worker_init_fn=worker_init_fn, **kwargs)

    def _get_iterator(self):
        if self.num_workers == 0 or threading.current_thread() is not threading.main_thread():
            return super()._get_iterator()
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            return super()._get_iterator()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def eval_loader(dataset: Dataset, batch_size: int, collate_fn=None, num_workers: int | str = 0,
                device: torch.device | None = None, persistent: bool = False) -> Loader:
    """This rank's shard of an evaluation set (every sample exactly once over all ranks, no padding duplicates,
    which would bias the metric), in order, with stop-signal-proof workers and pinned memory for a CUDA device.
    `num_workers`: data.num_workers, a count or "auto" (distributed.loader_workers).

    `persistent`: the workers stay between passes (DataLoader's persistent_workers), for an evaluator that runs
    many times in a run; idle, they hold no batch (the next pass starts loading when it is iterated), and whoever
    keeps the loader shuts them down (`close_loader`)."""
    part = shard(dataset)
    workers = min(loader_workers(num_workers)[0], len(part))
    return Loader(part, batch_size=batch_size, shuffle=False, collate_fn=collate_fn, num_workers=workers,
                  pin_memory=device is not None and torch.device(device).type == "cuda",
                  persistent_workers=persistent and workers > 0)


def close_loader(loader: DataLoader | None) -> None:
    """Shut down the workers a persistent loader keeps (no-op for None or a loader without live workers)."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
        loader._iterator = None


def eval_batches(dataset: Dataset, batch_size: int, collate_fn, num_workers: int | str = 0,
                 device: torch.device | None = None):
    """`eval_loader`'s batches of dict samples, each split by the size of the samples' "image" and collated per
    size with `collate_fn`: yields batches whose images share one size, so no network sees another image's padding.
    A padded batch made dense metrics depend on the batch size and the number of processes (which images meet in
    a batch): now an image is predicted as it would be alone, as mmsegmentation evaluates and `predict` runs. Same-
    size images (a dataset of one resolution) still go through together, at full batch."""
    for samples in eval_loader(dataset, batch_size, list, num_workers, device):
        by_size = {}
        for sample in samples:
            by_size.setdefault(tuple(sample["image"].shape[-2:]), []).append(sample)
        for group in by_size.values():
            yield collate_fn(group)
