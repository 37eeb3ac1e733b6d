"""Each epoch's shuffled order of N samples without holding it: a seeded bijection of [0, N), computed for the
positions a rank needs, a chunk at a time.

DistributedSampler materialises the epoch's permutation (`torch.randperm(N).tolist()`: a Python int per sample,
about 5 GB per rank at 130M samples). Here position p of epoch e maps to sample `permute(p)`, a 4-round Feistel
network over the smallest power-of-4 domain holding N, keyed by (seed, epoch), with cycle-walking back into
[0, N) (the domain is under 4N, so a few walks at most). Memory is the chunk being yielded; the order of any
position can be computed directly, which is what resuming mid-epoch needs. Ranks split the positions as
DistributedSampler does: rank r takes positions r, r + W, ..., padded by repeating the start of the order so
every rank gets ceil(N / W).

Tar shards, where opening a shard costs as much as reading thousands of its samples, use `permute_blocked`
instead: blocks of consecutive samples (a few shards' worth) in a shuffled order, each shuffled inside, and
`rank_range_positions`, a contiguous part of the order per rank (pretrain/shards.py says why).
"""

import numpy as np

ROUNDS = 4
MASK64 = (1 << 64) - 1


def _splitmix64(value: int) -> int:
    value = (value + 0x9E3779B97F4A7C15) & MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & MASK64
    return value ^ (value >> 31)


def _mix(values: np.ndarray, key: np.uint64) -> np.ndarray:
    """A 64-bit hash of each value under `key` (uint64 arithmetic wraps, as the hash wants)."""
    z = (values + key) * np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(31)
    z *= np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(29))


def permute(positions: np.ndarray, size: int, seed: int, epoch: int) -> np.ndarray:
    """Samples at `positions` (ints in [0, size)) of epoch `epoch`'s shuffled order; a bijection of [0, size).

    Returns an int64 array shaped like `positions`. Raises ValueError for a size below 1.
    """
    if size < 1:
        raise ValueError(f"cannot shuffle {size} samples")
    half = max(1, ((size - 1).bit_length() + 1) // 2)  # 2 * half bits hold every value below size
    mask = np.uint64((1 << half) - 1)
    shift = np.uint64(half)
    keys = [np.uint64(_splitmix64((seed * 1_000_003 + epoch) * 8 + r)) for r in range(ROUNDS)]

    def feistel(x: np.ndarray) -> np.ndarray:
        left, right = x >> shift, x & mask
        for key in keys:
            left, right = right, left ^ (_mix(right, key) & mask)
        return (left << shift) | right

    out = feistel(np.asarray(positions, dtype=np.uint64))
    outside = out >= np.uint64(size)
    while outside.any():  # cycle-walking: apply again until inside [0, size); a bijection still
        out[outside] = feistel(out[outside])
        outside = out >= np.uint64(size)
    return out.astype(np.int64)


def rank_positions(start: int, stop: int, size: int, rank: int, world: int) -> np.ndarray:
    """Positions of the epoch's order for this rank's items start..stop-1 (rank r takes r, r + W, ...); positions
    past the end wrap to the start, as DistributedSampler pads."""
    return (rank + world * np.arange(start, stop, dtype=np.int64)) % size


def permute_blocked(positions: np.ndarray, size: int, block: int, seed: int, epoch: int) -> np.ndarray:
    """Samples at `positions` of an order that keeps to blocks of `block` consecutive samples: the blocks in a
    shuffled order, the samples of each block shuffled among themselves (wids' ChunkedSampler, as a bijection of
    [0, size) computed per position). For tar shards, where opening a shard costs as much as reading thousands of
    its samples, a block spans a few shards. The last, shorter block (size % block samples) stays last.

    Returns an int64 array shaped like `positions`. Raises ValueError for a size or block below 1.
    """
    if block < 1:
        raise ValueError(f"cannot shuffle in blocks of {block}")
    positions = np.asarray(positions, dtype=np.int64)
    full = size // block
    slot, offset = positions // block, positions % block
    out = np.empty_like(positions)
    chosen = slot.copy()
    in_full = slot < full
    if full:
        chosen[in_full] = permute(slot[in_full], full, seed, epoch)
    for number in np.unique(chosen):  # a chunk of positions meets few blocks
        here = chosen == number
        length = min(block, size - int(number) * block)
        inner = permute(offset[here], length, seed * 1_000_033 + int(number) + 1, epoch)
        out[here] = int(number) * block + inner
    return out


def rank_range_positions(start: int, stop: int, size: int, rank: int, world: int) -> np.ndarray:
    """Positions of this rank's items start..stop-1 when each rank takes a contiguous part of the epoch's order
    (rank r: positions r * n .. (r + 1) * n - 1, n = ceil(size / world)), wrapping past the end as
    DistributedSampler pads. With a blocked order, a rank then reads its own few shards at a time."""
    per_rank = -(-size // world)
    return (rank * per_rank + np.arange(start, stop, dtype=np.int64)) % size
