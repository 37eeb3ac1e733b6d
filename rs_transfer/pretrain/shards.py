"""Tar shards (webdataset layout) at 130M-sample scale: a per-shard descriptor, and samples read on demand.

A split of shards is described by FOLDER/index.json in wids' descriptor format (the indexed reader of the
webdataset project): `{"wids_version": 1, "shardlist": [{"url": "shard-00000.tar", "nsamples": N, "filesize":
B}, ...]}`, plus our `"rs_transfer"` entry (whether every image has a label, and the count of each label). One
`rs-transfer index FOLDER` pass writes it; with it, start-up reads no shard, and a process holds a few numbers
per shard, never an object per sample. Without it the shards are scanned at start-up (fine for thousands of
samples; a warning says when to index).

A shard is opened when a sample of it is first read: wids' `MMIndexedTar` scans its headers through mmap (67 ms
for 10k samples, 7x faster than tarfile), samples are grouped by webdataset's key rule, and the offsets stay in
a per-process cache of `OPEN_SHARDS` shards. Opening costs far more than reading one sample, so an epoch's order
must keep to a few shards at a time: `locality` says how many consecutive samples the engine's sampler should
shuffle together (engine/shuffle.py `permute_blocked`, as wids' ChunkedSampler does).

A sample is the members of one key (the name up to the first dot of its file name) in tar order: one image
(.jpg/.jpeg/.png/.webp/.bmp) and, for training, KEY.cls (the class index as text). Keys without an image are
named in a warning when indexing; a key with two images or two labels, or an image without a label in a labelled
split, is an error. Why wids and not webdataset's streaming pipeline, MosaicML streaming or litdata: see
docs/pretrain.md ("Tar shards at scale").
"""

import json
import logging
import multiprocessing
import os
import struct
import tarfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from wids.wids_mmtar import MMIndexedTar

from rs_transfer.data.text import ENCODING as TEXT_ENCODING
from rs_transfer.errors import UserError
from rs_transfer.files import atomic_write_json

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"
INDEX_FORMAT = 1  # our "rs_transfer" entry's version
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
OPEN_SHARDS = 24  # per process: the shards of one shuffled block (SHARDS_PER_BLOCK) plus its neighbours
SHARDS_PER_BLOCK = 8  # an epoch shuffles blocks of this many shards' samples, in a shuffled block order
NAMED_IN_WARNINGS = 5  # member names shown in a warning before "and N more"
SCAN_WARNING_SHARDS = 64  # more shards than this without an index.json: say that start-up reads every shard


class DataError(UserError):
    pass


@dataclass(frozen=True)
class ShardSample:
    """One sample: `ref` (SHARD/KEY) names it in warnings and pseudo-labels; `where` is (tar path, offset, size)
    of its image; `label` is its class, -1 when unlabelled."""

    ref: str
    label: int
    where: tuple


def split_key(name: str) -> tuple:
    """(key, extension with its dot, lower case) of a member name by webdataset's rule: the key is the path up to
    the first dot of the file name; ("", "") when a name has no key (no dot, or a file name starting with one)."""
    folder, _, base = name.rpartition("/")
    stem, dot, extension = base.partition(".")
    if not stem or not dot:
        return "", ""
    return (f"{folder}/{stem}" if folder else stem), "." + extension.lower()


def first_names(names: list, count: Optional[int] = None) -> str:
    """The first NAMED_IN_WARNINGS of `names`, then "and N more" of `count` (default: len(names))."""
    shown = ", ".join(names[:NAMED_IN_WARNINGS])
    more = (len(names) if count is None else count) - min(len(names), NAMED_IN_WARNINGS)
    return f"{shown} and {more} more" if more > 0 else shown


def _sample_rule(unused: list) -> str:
    rule = (f"a sample is KEY{'|'.join(IMAGE_EXTENSIONS)} with KEY.cls when labelled, KEY being the member name up "
            "to the first dot of its file name (webdataset's rule)")
    example = next((name for name in unused if split_key(name)[0]), None)
    if example is None:
        return rule
    key, extension = split_key(example)
    return f"{rule}: {example!r} is key {key!r} with extension {extension[1:]!r}"


def _tarfile_members(path: Path) -> list:
    """(name, data offset, size) of the regular members, read by Python's tarfile (PAX and GNU headers too)."""
    try:
        with tarfile.open(path, "r:") as tar:
            return [(m.name, m.offset_data, m.size) for m in tar if m.isfile()]
    except (tarfile.TarError, OSError) as error:
        raise DataError(f"cannot read tar shard {path}: {error} (shards must be uncompressed .tar)") from None


def _members(path: Path) -> list:
    """(name, data offset, size) of every regular member of a shard, in tar order.

    wids' mmap reader parses plain ustar headers only. Where a member does not start right after the one before,
    another header sits between them (a folder, a link, or a PAX/GNU header carrying a long or non-ASCII name that
    wids would read truncated), so such a shard is read with tarfile instead: correct, 7x slower to open."""
    try:
        reader = MMIndexedTar(str(path), verbose=False)
    except (OSError, ValueError, struct.error):
        return _tarfile_members(path)  # an empty, truncated or compressed file: tarfile names the problem
    try:
        members = list(reader.by_index)
    finally:
        reader.close()
    expected = 0
    for _, offset, size in members:
        if offset != expected:
            return _tarfile_members(path)
        expected = offset + 512 + (size + 511) // 512 * 512
    return [(name, offset + 512, size) for name, offset, size in members]


@dataclass
class OpenShard:
    """The samples of one shard in tar order: keys, image (offset, size) and label member (offset, size; -1 none)."""

    path: Path
    keys: list
    image: np.ndarray  # (n, 2) int64: data offset, size
    label: np.ndarray  # (n, 2) int64: data offset, size; (-1, 0) without a KEY.cls member
    not_used: list  # member names that belong to no sample

    def read_label(self, position: int) -> int:
        offset, size = self.label[position]
        if offset < 0:
            return -1
        raw = _read(self.path, offset, size)
        try:
            return int(raw.decode(TEXT_ENCODING).strip())  # a BOM or CRLF from a Windows tool is not part of it
        except (UnicodeDecodeError, ValueError):
            raise DataError(f"tar shard {self.path}: {self.keys[position]}.cls holds {raw[:40]!r}, not a class "
                             "index") from None


def _read(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as file:
        file.seek(int(offset))
        return file.read(int(size))


def open_shard(path: Path) -> OpenShard:
    """Group a shard's members into samples. Raises DataError for an unreadable shard, or a key with two images
    or two labels."""
    images, labels, not_used = {}, {}, []
    for name, offset, size in _members(path):
        key, extension = split_key(name)
        data = (offset, size)
        if key and extension in IMAGE_EXTENSIONS:
            if key in images:
                raise DataError(f"tar shard {path}: sample {key!r} holds two images, {images[key][0]} and {name}: "
                                 "a sample has one image member")
            images[key] = (name, data)
        elif key and extension == ".cls":
            if key in labels:
                raise DataError(f"tar shard {path}: sample {key!r} holds two labels, {labels[key][0]} and {name}")
            labels[key] = (name, data)
        else:
            not_used.append((name, key))
    keys = list(images)  # dicts keep insertion order: tar order
    image = np.array([images[k][1] for k in keys], dtype=np.int64).reshape(-1, 2)
    label = np.array([labels[k][1] if k in labels else (-1, 0) for k in keys], dtype=np.int64).reshape(-1, 2)
    not_used = [name for name, key in not_used if key not in images]
    not_used += [labels[k][0] for k in labels if k not in images]
    return OpenShard(path, keys, image, label, not_used)


def _scan(path: str) -> dict:
    """The descriptor entry of one shard, plus what indexing checks and reports (runs in a worker process)."""
    shard = open_shard(Path(path))
    labels = [shard.read_label(i) for i in range(len(shard.keys))]
    unlabelled = [k for k, label in zip(shard.keys, labels) if label < 0]
    negative = next((k for k, label in zip(shard.keys, labels) if label < -1), None)
    return {"nsamples": len(shard.keys), "filesize": os.path.getsize(path), "not_used": shard.not_used[:NAMED_IN_WARNINGS],
            "not_used_count": len(shard.not_used), "unlabelled": unlabelled[:1], "unlabelled_count": len(unlabelled),
            "negative": negative, "counts": np.bincount(np.array([x for x in labels if x >= 0], dtype=np.int64)).tolist()}


def describe(folder: str | Path, shards: Optional[list] = None, workers: int = 1) -> dict:
    """Scan every shard of `folder` (or the given ones) and return its index.json content. Raises DataError for
    no shard, an unreadable one, a broken sample, a negative label, or a split where some images have a label
    and others not."""
    folder = Path(folder)
    paths = sorted(folder.glob("*.tar")) if shards is None else [Path(s) for s in shards]
    if not paths:
        raise DataError(f"no .tar shards in {folder}")
    if workers > 1:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            entries = pool.map(_scan, map(str, paths), chunksize=4)
    else:
        entries = [_scan(str(p)) for p in paths]
    counts = np.zeros(0, dtype=np.int64)
    unlabelled = sum(e["unlabelled_count"] for e in entries)
    total = sum(e["nsamples"] for e in entries)
    not_used = 0
    for path, entry in zip(paths, entries):
        if entry["not_used_count"]:
            not_used += entry["not_used_count"]
            log.warning("tar shard %s: %d member(s) not used: %s (%s)", path, entry["not_used_count"],
                        first_names(entry["not_used"], entry["not_used_count"]), _sample_rule(entry["not_used"]))
        if entry["negative"] is not None:
            raise DataError(f"tar shard {path}: {entry['negative']}.cls holds a negative class index")
        if 0 < unlabelled < total and entry["unlabelled_count"]:
            raise DataError(f"tar shard {path}: image {entry['unlabelled'][0]!r} has no {entry['unlabelled'][0]}.cls "
                             "label member, while other images of the split have one")
        grown = np.zeros(max(len(counts), len(entry["counts"])), dtype=np.int64)
        grown[:len(counts)] += counts
        grown[:len(entry["counts"])] += np.asarray(entry["counts"], dtype=np.int64)
        counts = grown
    if not_used:
        log.warning("%d member(s) of %d tar shard(s) were not used (named above)", not_used,
                    sum(1 for e in entries if e["not_used_count"]))
    if total == 0:
        raise DataError(f"no images found in tar shards {', '.join(map(str, paths[:NAMED_IN_WARNINGS]))}")
    return {"wids_version": 1, "name": folder.name,
            "shardlist": [{"url": os.path.relpath(p, folder), "nsamples": e["nsamples"], "filesize": e["filesize"]}
                          for p, e in zip(paths, entries)],
            "rs_transfer": {"format": INDEX_FORMAT, "labelled": unlabelled == 0,
                            "label_counts": counts.tolist() if unlabelled == 0 else None,
                            "first_unlabelled": next((f"{p.name}/{e['unlabelled'][0]}" for p, e in zip(paths, entries)
                                                      if e["unlabelled"]), None)}}


def write_index(folder: str | Path, workers: int = 1) -> Path:
    """`rs-transfer index FOLDER`: scan every shard once and write FOLDER/index.json (atomically)."""
    folder = Path(folder)
    return atomic_write_json(folder / INDEX_NAME, describe(folder, workers=workers))


def read_index(folder: str | Path) -> dict:
    """FOLDER/index.json if it is there, else a scan of every shard. Raises DataError for an index that is not
    a shard descriptor or lists no shard."""
    folder = Path(folder)
    path = folder / INDEX_NAME
    if not path.is_file():
        shards = sorted(folder.glob("*.tar"))
        if len(shards) > SCAN_WARNING_SHARDS:
            log.warning("%s: %d shards and no %s: every shard is scanned at start-up; `rs-transfer index %s` "
                        "writes it once", folder, len(shards), INDEX_NAME, folder)
        return describe(folder, shards)
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
        shardlist = index["shardlist"]
        entries = [(str(e["url"]), int(e["nsamples"]), e.get("filesize")) for e in shardlist]
        ours = index.get("rs_transfer") or {}
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise DataError(f"{path} is not a shard index (wids descriptor with a shardlist of url/nsamples): "
                         f"{error}; rewrite it with `rs-transfer index {folder}`") from None
    if not entries:
        raise DataError(f"{path} lists no shards")
    return {"wids_version": 1, "name": index.get("name", folder.name),
            "shardlist": [{"url": u, "nsamples": n, "filesize": f} for u, n, f in entries],
            "rs_transfer": {"format": ours.get("format"), "labelled": ours.get("labelled"),
                            "label_counts": ours.get("label_counts"), "first_unlabelled": ours.get("first_unlabelled")}}


class ShardImages:
    """The samples of a list of shards as a sequence: `images[i]` is a ShardSample, read on demand.

    Memory is a few numbers per shard (paths, cumulative counts) plus the OPEN_SHARDS open shards' offsets; a
    pickled copy (a DataLoader worker under spawn) starts with none open. `locality` is the number of
    consecutive samples an epoch should shuffle together (SHARDS_PER_BLOCK shards' worth)."""

    def __init__(self, folder: str | Path, index: dict, shard_numbers: Optional[list] = None):
        self.folder = Path(folder)
        self.index = index
        entries = index["shardlist"]
        self.shard_numbers = list(range(len(entries))) if shard_numbers is None else sorted(shard_numbers)
        self.paths = [self.folder / entries[s]["url"] for s in self.shard_numbers]
        counts = np.array([entries[s]["nsamples"] for s in self.shard_numbers], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(counts)])
        self.filesizes = [entries[s].get("filesize") for s in self.shard_numbers]
        meta = index.get("rs_transfer") or {}
        self.labelled = bool(meta.get("labelled"))
        self.label_counts = meta.get("label_counts") if shard_numbers is None else None
        self.locality = int(max(1, counts.mean() if len(counts) else 1) * SHARDS_PER_BLOCK)
        self._open = OrderedDict()

    def __getstate__(self):
        return {**self.__dict__, "_open": OrderedDict()}

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def num_shards(self) -> int:
        return len(self.paths)

    def subset(self, shard_numbers: list) -> "ShardImages":
        """The samples of some of this set's shards (numbers into this set's shard list)."""
        return ShardImages(self.folder, self.index, [self.shard_numbers[s] for s in shard_numbers])

    def locate(self, index: int) -> tuple:
        """(shard number in this set, position in the shard) of sample `index`."""
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} of {len(self)}")
        shard = int(np.searchsorted(self.starts, index, side="right")) - 1
        return shard, index - int(self.starts[shard])

    def shard(self, number: int) -> OpenShard:
        shard = self._open.get(number)
        if shard is None:
            path = self.paths[number]
            shard = open_shard(path)
            expected = int(self.starts[number + 1] - self.starts[number])
            if len(shard.keys) != expected:
                raise DataError(f"tar shard {path} holds {len(shard.keys)} samples but {self.folder / INDEX_NAME} "
                                 f"says {expected}: the shards changed; rerun `rs-transfer index {self.folder}`")
            self._open[number] = shard
            if len(self._open) > OPEN_SHARDS:
                self._open.popitem(last=False)
        else:
            self._open.move_to_end(number)
        return shard

    def __getitem__(self, index):
        if isinstance(index, slice):  # a list of samples: for small sets (tests, `bench data`), not 130M
            return [self[i] for i in range(*index.indices(len(self)))]
        number, position = self.locate(index)
        shard = self.shard(number)
        offset, size = shard.image[position]
        return ShardSample(f"{self.paths[number].name}/{shard.keys[position]}", shard.read_label(position),
                           (str(shard.path), int(offset), int(size)))

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def describe(self) -> dict:
        """What identifies this set in pseudo-label metadata: folder, shard count, sample count."""
        return {"folder": str(self.folder.resolve()), "shards": self.num_shards, "samples": len(self)}


def open_split(folder: str | Path) -> ShardImages:
    """The shards of `folder` through its index.json (or a scan). Every listed shard must exist with the size
    indexed (one stat per shard: about 10 ms per 1000 on a local disk), else DataError names it and the fix."""
    folder = Path(folder)
    images = ShardImages(folder, read_index(folder))
    for path, size in zip(images.paths, images.filesizes):
        try:
            actual = path.stat().st_size
        except OSError as error:
            raise DataError(f"tar shard {path}, listed in {folder / INDEX_NAME}, cannot be read: "
                            f"{error.strerror or error}; rerun `rs-transfer index {folder}` if shards moved") from None
        if size is not None and actual != size:
            raise DataError(f"tar shard {path} has {actual} bytes but {folder / INDEX_NAME} says {size}: the shards "
                            f"changed; rerun `rs-transfer index {folder}`")
    return images


def minival_shards(images: ShardImages, fraction: float, seed: int) -> tuple:
    """(train, minival) of a shard set: round(fraction x shards) whole shards held out, at least one, chosen by a
    seeded permutation of the shard names (the paper holds out 20 of 1024 shards, 2%). Raises DataError when a
    set of one shard cannot be split."""
    count = images.num_shards
    if count < 2:
        raise DataError(f"{images.folder}: data.eval_split=minival holds out whole shards, and there is only one; "
                         "write more shards or use data.eval_split=val")
    held = min(count - 1, max(1, round(count * fraction)))
    order = sorted(range(count), key=lambda s: images.paths[s].name)
    permutation = np.random.default_rng(seed).permutation(count)
    minival = sorted(order[i] for i in permutation[:held])
    train = sorted(order[i] for i in permutation[held:])
    return images.subset(train), images.subset(minival)
