"""Resumable sampling: which sample each rank loads at each step of a run, and the random state it is loaded with.

The data order of an epoch is a function of (seed, epoch) alone (RunSampler, on engine/shuffle.py), and each
sample seeds the random generators from (seed, epoch, index) before it is loaded (SeededSamples). A run resumed
mid-epoch therefore loads the same samples with the same augmentations as an uninterrupted one, whatever the
number of loader workers.
"""

import math
import random

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, get_worker_info

from rs_transfer.engine import shuffle


class RunSampler(Sampler):
    """The keys (epoch, index) this rank loads for the rest of the run, from `start` = (epoch, position in this
    rank's part of it) on, `count` keys in all.

    Each epoch is a seeded shuffle of the dataset (engine/shuffle.py: computed a chunk at a time, never held
    whole), split over ranks as DistributedSampler splits it, and cut to `samples_per_epoch` (whole optimizer
    steps), so batches never straddle two epochs. One loader iterator serves the whole run: its workers keep
    loading ahead across epoch boundaries, and each sample's epoch travels with its key.
    """

    CHUNK = 65536  # positions computed at once: memory stays this size whatever the dataset's

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int):
        self.size, self.world, self.rank, self.seed = len(dataset), num_replicas, rank, seed
        # Tar shards want an order that keeps to a few shards at a time (shards.py): blocks, and contiguous
        # parts per rank; other datasets read any sample as cheaply, so their order is one global shuffle.
        self.block = int(getattr(dataset, "locality", 0) or 0)
        self.num_samples = math.ceil(self.size / num_replicas)  # per rank and epoch, as DistributedSampler
        self.samples_per_epoch = self.num_samples
        self.start = (0, 0)
        self.count = 0

    def __iter__(self):
        epoch, offset = self.start
        left = self.count
        while left > 0:
            stop = min(self.samples_per_epoch, offset + left)
            for first in range(offset, stop, self.CHUNK):
                for index in self.indices(epoch, first, min(first + self.CHUNK, stop)).tolist():
                    yield epoch, index
            left -= stop - offset
            epoch, offset = epoch + 1, 0

    def __getitem__(self, position: int) -> tuple:
        """Key `position` of this rank's keys (what iterating yields, as a sequence for loaders that read ahead by
        position, e.g. DALI's external source); computed a chunk at a time and the last chunk kept."""
        if not 0 <= position < self.count:
            raise IndexError(f"key {position} of {self.count}")
        epoch, offset = self.start
        offset += position
        epoch, offset = epoch + offset // self.samples_per_epoch, offset % self.samples_per_epoch
        first = offset - offset % self.CHUNK
        if getattr(self, "_chunk", (None,))[0] != (epoch, first):
            self._chunk = (epoch, first), self.indices(epoch, first, min(first + self.CHUNK, self.samples_per_epoch))
        return epoch, int(self._chunk[1][offset - first])

    def indices(self, epoch: int, start: int, stop: int) -> np.ndarray:
        """Sample indices of this rank's positions start..stop-1 of `epoch`."""
        if self.block:
            positions = shuffle.rank_range_positions(start, stop, self.size, self.rank, self.world)
            return shuffle.permute_blocked(positions, self.size, self.block, self.seed, epoch)
        positions = shuffle.rank_positions(start, stop, self.size, self.rank, self.world)
        return shuffle.permute(positions, self.size, self.seed, epoch)

    def __len__(self) -> int:
        return self.count


class SeededSamples(Dataset):
    """Item (epoch, index): sample `index`, after seeding the torch, numpy and random generators from (seed, epoch,
    index).

    A sample's random augmentation then depends on nothing else: not on which worker loads it, how many workers
    there are (none included), or where a resumed epoch restarts, so resume is exact and `data.num_workers` may
    change between a run and its resume. In the main process (num_workers=0) the global generators also drive
    dropout and stochastic depth, so their state is put back after the sample: training draws the same random
    numbers with or without workers.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple):
        epoch, index = key
        if get_worker_info() is not None:  # a worker process: its generators serve the samples alone
            self._seed(epoch, index)
            return self.dataset[index]
        states = torch.get_rng_state(), np.random.get_state(), random.getstate()
        try:
            self._seed(epoch, index)
            return self.dataset[index]
        finally:
            torch.set_rng_state(states[0])
            np.random.set_state(states[1])
            random.setstate(states[2])

    def _seed(self, epoch: int, index: int) -> None:
        seed = hash((self.seed, epoch, index)) % 2**63
        torch.default_generator.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)
