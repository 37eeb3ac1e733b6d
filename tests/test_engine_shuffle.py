"""Each epoch's order without holding it: a bijection per (seed, epoch), split over ranks as DistributedSampler
splits, resumable at any position, in memory that does not grow with the dataset."""

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from rs_transfer.engine.shuffle import permute, permute_blocked, rank_positions, rank_range_positions
from rs_transfer.engine.sampling import RunSampler


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, 1000, 1001, 65537])
def test_every_epoch_order_is_a_permutation(size):
    order = permute(np.arange(size), size, seed=3, epoch=5)
    assert order.dtype == np.int64 and np.array_equal(np.sort(order), np.arange(size))


def test_orders_depend_on_seed_and_epoch_only():
    base = permute(np.arange(1000), 1000, seed=0, epoch=0)
    assert np.array_equal(base, permute(np.arange(1000), 1000, seed=0, epoch=0))
    assert not np.array_equal(base, permute(np.arange(1000), 1000, seed=0, epoch=1))
    assert not np.array_equal(base, permute(np.arange(1000), 1000, seed=1, epoch=0))
    # A shuffle, not a near-identity: few samples keep their place.
    assert (base == np.arange(1000)).sum() < 20


def test_ranks_split_an_epoch_like_distributed_sampler():
    size, world = 10, 4  # 3 per rank, the last two padded with the start of the order
    order = permute(np.arange(size), size, seed=0, epoch=0)
    parts = [order[rank_positions(0, 3, size, rank, world)].tolist() for rank in range(world)]
    padded = order.tolist() + order[:2].tolist()
    assert parts == [padded[rank::world] for rank in range(world)]
    reference = [list(DistributedSampler(range(size), num_replicas=world, rank=r, shuffle=False)) for r in range(world)]
    assert [[order[i] for i in part] for part in reference] == parts  # the same split of positions


def keys(sampler, start, count):
    sampler.start, sampler.count = start, count
    return list(sampler)


def test_run_sampler_resumes_at_any_position_and_crosses_epochs():
    sampler = RunSampler(range(103), num_replicas=2, rank=1, seed=7)
    sampler.samples_per_epoch = 48  # 52 per rank and epoch, cut to whole steps of 16
    whole = keys(sampler, (0, 0), 48 * 3)
    assert [epoch for epoch, _ in whole] == [0] * 48 + [1] * 48 + [2] * 48
    assert len({index for epoch, index in whole if epoch == 0}) == 48
    assert keys(sampler, (1, 32), 48 + 16) == whole[48 + 32:]
    assert len(sampler) == 48 + 16


def test_a_130m_sample_epoch_is_not_held_in_memory():
    import resource

    sampler = RunSampler(range(130_000_000), num_replicas=8, rank=3, seed=0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sampler.start, sampler.count = (4, 16_000_000), 200_000  # deep inside epoch 4: no earlier position computed
    first = list(sampler)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert len(first) == 200_000 and grown_mb < 100  # a Python list of one epoch's 16M indices alone is ~600 MB
    position = 3 + 8 * 16_000_000
    assert first[0] == (4, int(permute(np.array([position]), 130_000_000, 0, 4)[0]))
    assert torch.tensor([index for _, index in first]).unique().numel() == 200_000


@pytest.mark.parametrize("size,block", [(1, 1), (10, 3), (100, 10), (1001, 64), (5000, 4096), (7, 100)])
def test_a_blocked_order_is_a_permutation_that_keeps_to_its_blocks(size, block):
    order = permute_blocked(np.arange(size), size, block, seed=2, epoch=3)
    assert order.dtype == np.int64 and np.array_equal(np.sort(order), np.arange(size))
    for start in range(0, size, block):  # each run of `block` positions is one block's samples, shuffled
        run = order[start:start + block]
        assert len(set((run // block).tolist())) == 1
    tail = size % block
    if tail and size > block:  # the shorter last block stays last
        assert set(order[-tail:].tolist()) == set(range(size - tail, size))


def test_blocked_orders_shuffle_blocks_and_samples_per_epoch():
    size, block = 64_000, 1000
    first = permute_blocked(np.arange(size), size, block, seed=0, epoch=0)
    second = permute_blocked(np.arange(size), size, block, seed=0, epoch=1)
    assert not np.array_equal(first // block, second // block)  # another block order
    assert (first[:block] == np.arange(block) + first[0] // block * block).sum() < 20  # shuffled inside a block
    assert np.array_equal(first, permute_blocked(np.arange(size), size, block, seed=0, epoch=0))


def test_ranks_take_contiguous_parts_of_a_blocked_order_covering_the_epoch_once():
    size, world, block = 1003, 4, 50
    per_rank = -(-size // world)
    parts = [permute_blocked(rank_range_positions(0, per_rank, size, rank, world), size, block, 5, 0)
             for rank in range(world)]
    seen = np.concatenate(parts)
    assert len(seen) == per_rank * world and set(seen.tolist()) == set(range(size))  # one pass, padded
    assert len(seen) - len(set(seen.tolist())) == per_rank * world - size
    for part in parts:  # a rank reads few blocks at a time: within any 50 of its samples, at most 2 blocks
        assert max(len(set((part[i:i + block] // block).tolist())) for i in range(0, per_rank - block)) <= 2


def test_run_sampler_uses_the_blocked_order_for_datasets_that_ask_for_locality():
    class Shards:
        locality = 100

        def __len__(self):
            return 1000

    sampler = RunSampler(Shards(), num_replicas=2, rank=1, seed=7)
    whole = [index for _, index in keys(sampler, (0, 0), 500)]
    assert whole == permute_blocked(np.arange(500, 1000), 1000, 100, 7, 0).tolist()
    assert [index for _, index in keys(sampler, (0, 230), 270)] == whole[230:]  # resumes at any position


def test_run_sampler_as_a_sequence_gives_the_keys_iteration_gives():
    class Shards:
        locality = 30

        def __len__(self):
            return 103

    for dataset in (range(103), Shards()):
        sampler = RunSampler(dataset, num_replicas=2, rank=0, seed=3)
        sampler.samples_per_epoch = 48
        sampler.CHUNK = 20  # several chunks per epoch, so the cached chunk is replaced
        sampler.start, sampler.count = (1, 37), 100  # mid-epoch, across two epoch ends
        assert [sampler[i] for i in range(len(sampler))] == list(sampler)
        with pytest.raises(IndexError):
            sampler[100]
