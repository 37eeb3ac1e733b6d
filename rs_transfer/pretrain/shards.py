"""Tar shards (webdataset layout) at 130M-sample scale: a per-shard descriptor, and samples read on demand.

A split of shards is described by FOLDER/index.json in wids' descriptor format (the indexed reader of the
webdataset project): `{"wids_version": 1, "shardlist": [{"url": "shard-00000.tar", "nsamples": N, "filesize":
B}, ...]}`, plus our `"rs_transfer"` entry (whether every image has a label, and the count of each label). One
`rs-transfer index FOLDER` pass writes it; with it, start-up reads no shard, and a process holds a few numbers
per shard, never an object per sample. Without it the shards are scanned at start-up (fine for thousands of
samples; a warning says when to index).

A shard is opened when a sample of it is first read: wids' `MMIndexedTar` scans its headers through mmap (83 ms
for 10k samples, 7x faster than tarfile: tools/shard_and_table_times.py), samples are grouped by webdataset's
key rule, and the offsets stay in a per-process cache of `OPEN_SHARDS` shards. Opening costs far more than reading one sample, so an epoch's order
must keep to a few shards at a time: `locality` says how many consecutive samples the engine's sampler should
shuffle together (engine/shuffle.py `permute_blocked`, as wids' ChunkedSampler does).

A sample is the members of one key (the name up to the first dot of its file name) in tar order: one image
(.jpg/.jpeg/.png/.webp/.bmp) and, for training, KEY.cls (the class index as text). Keys without an image are
named in a warning when indexing; a key with two images or two labels is an error; a missing or invalid label is
recorded in the index and refused by training only (pseudo-labelling reads no label). A shard cut short, or
changed after indexing, is an error naming it. Why wids and not webdataset's streaming pipeline, MosaicML streaming or litdata: see
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
from rs_transfer.errors import DataError
from rs_transfer.files import FileWriteError, atomic_write_json

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"
INDEX_FORMAT = 1  # our "rs_transfer" entry's version
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
OPEN_SHARDS = 24  # per process: the shards of one shuffled block (SHARDS_PER_BLOCK) plus its neighbours
SHARDS_PER_BLOCK = 8  # an epoch shuffles blocks of this many shards' samples, in a shuffled block order
NAMED_IN_WARNINGS = 5  # member names shown in a warning before "and N more"
MAX_CLASSES = 1 << 20  # a .cls above this is not a class index (ImageNet-21k has 21841, JFT 18291)
# Samples of one shard above this are not a count (a billion samples is a ~100 TB tar; webdataset shards hold
# thousands): the cumulative counts are int64, and a hand-edited 1e30 would overflow them.
MAX_SHARD_SAMPLES = 10**9
SCAN_WARNING_SHARDS = 64  # more shards than this without an index.json: say that start-up reads every shard


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


def _truncated(path: Path, end: int) -> DataError:
    return DataError(f"tar shard {path} is truncated: its members end at byte {end} with no end-of-archive block "
                     "after them (a copy or write that stopped early?); write it again")


def _tarfile_members(path: Path) -> tuple:
    """(regular members as (name, data offset, size), names of link and device members) by Python's tarfile,
    which reads PAX and GNU headers too. Raises DataError for an unreadable or truncated shard."""
    try:
        with tarfile.open(path, "r:") as tar:
            members = tar.getmembers()
            end = tar.offset  # where the end-of-archive block must be
    except (tarfile.TarError, OSError) as error:
        raise DataError(f"cannot read tar shard {path}: {error} (shards must be uncompressed .tar)") from None
    if not _ends_with_zero_block(path, end):
        raise _truncated(path, end)
    regular = [(m.name, m.offset_data, m.size) for m in members if m.isfile()]
    other = [m.name for m in members if not m.isfile() and not m.isdir()]
    return regular, other


def _ends_with_zero_block(path: Path, end: int) -> bool:
    with open(path, "rb") as file:
        file.seek(end)
        block = file.read(512)
    return len(block) == 512 and not any(block)


def _members(path: Path) -> tuple:
    """(regular members as (name, data offset, size) in tar order, names of link and device members).

    wids' mmap reader parses plain ustar headers only. Where a member does not start right after the one before,
    another header sits between them (a folder, a link, or a PAX/GNU header carrying a long or non-ASCII name that
    wids would read truncated), so such a shard is read with tarfile instead: correct, 7x slower to open. A shard
    whose last member is not followed by the end-of-archive block was cut short: DataError."""
    try:
        reader = MMIndexedTar(str(path), verbose=False)
    except (OSError, ValueError, struct.error):
        return _tarfile_members(path)  # an empty, truncated or compressed file: tarfile names the problem
    try:
        members = list(reader.by_index)
    finally:
        reader.close()
    end = 0
    for _, offset, size in members:
        if offset != end:
            return _tarfile_members(path)
        end = offset + 512 + (size + 511) // 512 * 512
    if not _ends_with_zero_block(path, end):  # a link or folder entry last, or a cut: tarfile tells which
        return _tarfile_members(path)
    return [(name, offset + 512, size) for name, offset, size in members], []


@dataclass
class OpenShard:
    """The samples of one shard in tar order: keys, image (offset, size) and label member (offset, size; -1 none)."""

    path: Path
    keys: list
    image: np.ndarray  # (n, 2) int64: data offset, size
    label: np.ndarray  # (n, 2) int64: data offset, size; (-1, 0) without a KEY.cls member
    not_used: list  # member names that belong to no sample

    def read_label(self, position: int) -> Optional[int]:
        """The class index in KEY.cls, None without one. Raises DataError for text that is not an integer >= 0."""
        offset, size = self.label[position]
        if offset < 0:
            return None
        raw = _read(self.path, offset, size)
        try:
            label = int(raw.decode(TEXT_ENCODING).strip())  # a BOM or CRLF from a Windows tool is not part of it
        except (UnicodeDecodeError, ValueError):
            label = -1
        if not 0 <= label < MAX_CLASSES:
            raise DataError(f"tar shard {self.path}: {self.keys[position]}.cls holds {raw[:40]!r}, not a class index "
                            f"(an integer from 0 to {MAX_CLASSES - 1})")
        return label


def _read(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as file:
        file.seek(int(offset))
        return file.read(int(size))


def open_shard(path: Path) -> OpenShard:
    """Group a shard's members into samples. Raises DataError for an unreadable or truncated shard, or a key with
    two images or two labels."""
    images, labels, not_used = {}, {}, []
    members, other = _members(path)
    for name, offset, size in members:
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
    not_used += [labels[k][0] for k in labels if k not in images] + other
    return OpenShard(path, keys, image, label, not_used)


def _scan(path: str) -> dict:
    """The descriptor entry of one shard, plus what indexing reports (runs in a worker process): label problems
    are recorded, not raised, since an unlabelled use (pseudo-labelling) does not read labels."""
    shard = open_shard(Path(path))
    counts, unlabelled, problem = {}, [], None
    for position, key in enumerate(shard.keys):
        try:
            label = shard.read_label(position)
        except DataError as error:
            problem = problem or str(error)
            continue
        if label is None:
            unlabelled.append(key)
        else:
            counts[label] = counts.get(label, 0) + 1
    return {"nsamples": len(shard.keys), "filesize": os.path.getsize(path), "first": shard.keys[0] if shard.keys else "",
            "not_used": shard.not_used[:NAMED_IN_WARNINGS], "not_used_count": len(shard.not_used),
            "unlabelled": unlabelled[:1], "unlabelled_count": len(unlabelled), "problem": problem,
            "counts": sorted(counts.items())}


def describe(folder: str | Path, shards: Optional[list] = None, workers: int = 1) -> dict:
    """Scan every shard of `folder` (or the given ones) and return its index.json content. The split is labelled
    when every image has a valid KEY.cls; otherwise `label_problem` says what is wrong, for a training run to
    report (pseudo-labelling does not need labels). Raises DataError for a missing folder, no shard, an
    unreadable or truncated one, a key with two images or two labels, or no image at all."""
    folder = Path(folder)
    paths = _shard_paths(folder, shards)
    entries = _scan_shards(paths, workers)
    counts = _label_counts(paths, entries)
    total = sum(e["nsamples"] for e in entries)
    if total == 0:
        raise DataError(f"no images found in tar shards {', '.join(map(str, paths[:NAMED_IN_WARNINGS]))}")
    problem = _label_problem(folder, paths, entries, total)
    labelled = problem is None
    label_counts = [counts.get(c, 0) for c in range(max(counts) + 1)] if labelled else None
    return {"wids_version": 1, "name": folder.name,
            "shardlist": [{"url": os.path.relpath(p, folder), "nsamples": e["nsamples"], "filesize": e["filesize"],
                           "first": e["first"]} for p, e in zip(paths, entries)],
            "rs_transfer": {"format": INDEX_FORMAT, "labelled": labelled, "label_counts": label_counts,
                            "label_problem": problem}}


def _shard_paths(folder: Path, shards: Optional[list]) -> list:
    """The .tar shards of `folder` in name order, or the given ones. Raises DataError for a missing folder or no
    shard (naming the sub-folders that hold shards, when the user gave their parent)."""
    if shards is None and not folder.is_dir():
        raise DataError(f"shard folder not found: {folder}")
    paths = sorted(folder.glob("*.tar")) if shards is None else [Path(s) for s in shards]
    if not paths:
        below = sorted(p.name for p in folder.iterdir() if p.is_dir() and any(p.glob("*.tar"))) if folder.is_dir() \
            else []
        hint = f"; its sub-folders {', '.join(below)} hold shards: give each of them" if below else ""
        raise DataError(f"no .tar shards in {folder}{hint}")
    return paths


def _scan_shards(paths: list, workers: int) -> list:
    """`_scan` of each shard, in `workers` spawned processes when more than one."""
    if workers > 1:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            return pool.map(_scan, map(str, paths), chunksize=4)
    return [_scan(str(p)) for p in paths]


def _label_counts(paths: list, entries: list) -> dict:
    """{label: images} over all shards; warns of the members no sample uses, per shard and in all."""
    counts = {}
    not_used = 0
    for path, entry in zip(paths, entries):
        if entry["not_used_count"]:
            not_used += entry["not_used_count"]
            log.warning("tar shard %s: %d member(s) not used: %s (%s)", path, entry["not_used_count"],
                        first_names(entry["not_used"], entry["not_used_count"]), _sample_rule(entry["not_used"]))
        for label, count in entry["counts"]:
            counts[label] = counts.get(label, 0) + count
    if not_used:
        log.warning("%d member(s) of %d tar shard(s) were not used (named above)", not_used,
                    sum(1 for e in entries if e["not_used_count"]))
    return counts


def _label_problem(folder: Path, paths: list, entries: list, total: int) -> Optional[str]:
    """Why the split is not labelled (a shard's own problem first, else the first image without a label), or
    None; a partly labelled split is warned about (a wholly unlabelled one is normal for pseudo-labelling)."""
    problem = next((e["problem"] for e in entries if e["problem"]), None)
    unlabelled = sum(e["unlabelled_count"] for e in entries)
    if problem is None and unlabelled:
        first = next(f"{p.name}/{e['unlabelled'][0]}" for p, e in zip(paths, entries) if e["unlabelled"])
        problem = (f"image {first} has no .cls label member" +
                   (f" ({unlabelled} of {total} images have none)" if unlabelled < total else ""))
    if problem is not None and unlabelled < total:
        log.warning("%s: the split is not fully labelled, fine for pseudo-labelling, an error for training: %s",
                    folder, problem)
    return problem


def write_index(folder: str | Path, workers: int = 1) -> Path:
    """`rs-transfer index FOLDER`: scan every shard once and write FOLDER/index.json (atomically). Raises
    DataError as `describe` does, and FileWriteError naming index.json when the folder cannot be written."""
    folder = Path(folder)
    if workers < 1:
        raise DataError(f"--workers must be at least 1, got {workers}")
    index = describe(folder, workers=workers)
    try:
        return atomic_write_json(folder / INDEX_NAME, index)
    except FileWriteError as error:
        raise FileWriteError(f"cannot write {folder / INDEX_NAME}: {error.__cause__ or error}; index a writable copy "
                             "of the folder (index.json travels with the shards), or train without it (every shard "
                             "is then scanned at start-up)") from None


def _count(value, most: int | None) -> bool:
    """Whether `value` (from index.json) is an integer >= 0 (not a bool), and <= `most` when given."""
    return (isinstance(value, int) and not isinstance(value, bool) and value >= 0
            and (most is None or value <= most))


def read_index(folder: str | Path) -> dict:
    """FOLDER/index.json if it is there, else a scan of every shard. Raises DataError for an index that is not
    a shard descriptor: no shard list, a count that is not an integer >= 0 (nsamples also <= MAX_SHARD_SAMPLES), a
    shard listed twice or outside FOLDER, label counts that are not a list of counts (at most MAX_CLASSES)."""
    folder = Path(folder)
    path = folder / INDEX_NAME
    if not path.is_file():
        shards = sorted(folder.glob("*.tar"))
        if len(shards) > SCAN_WARNING_SHARDS:
            log.warning("%s: %d shards and no %s: every shard is scanned at start-up; `rs-transfer index %s` "
                        "writes it once", folder, len(shards), INDEX_NAME, folder)
        return describe(folder, shards)
    fix = f"rewrite it with `rs-transfer index {folder}`"
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
        entries = [(e["url"], e["nsamples"], e.get("filesize"), e.get("first")) for e in index["shardlist"]]
        ours = index.get("rs_transfer") or {}
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as error:
        raise DataError(f"{path} is not a shard index (wids descriptor with a shardlist of url/nsamples): "
                        f"{error}; {fix}") from None
    if not entries:
        raise DataError(f"{path} lists no shards; {fix}")
    if not isinstance(ours, dict):
        raise DataError(f"{path}: \"rs_transfer\" is a JSON {type(ours).__name__}, not an object; {fix}")
    counts = ours.get("label_counts")
    if counts is not None and not (isinstance(counts, list) and len(counts) <= MAX_CLASSES
                                   and all(_count(c, None) for c in counts)):
        raise DataError(f"{path}: label_counts is not a list of at most {MAX_CLASSES} integers >= 0; {fix}")
    seen = set()
    for url, count, size, _ in entries:
        where = f"{path}: shard {url!r}"
        if not isinstance(url, str) or Path(url).is_absolute() or ".." in Path(url).parts:
            raise DataError(f"{where} is not a path inside {folder} (shards are listed relative to their index); {fix}")
        if url in seen:
            raise DataError(f"{where} is listed twice; {fix}")
        seen.add(url)
        for name, value in (("nsamples", count), ("filesize", size)):
            if value is not None and not _count(value, MAX_SHARD_SAMPLES if name == "nsamples" else None):
                raise DataError(f"{where} has {name} {value!r}, not an integer >= 0"
                                f"{f' and <= {MAX_SHARD_SAMPLES:.0e}' if name == 'nsamples' else ''}; {fix}")
        if count is None:
            raise DataError(f"{where} has no nsamples; {fix}")
    return {"wids_version": 1, "name": index.get("name", folder.name),
            "shardlist": [{"url": u, "nsamples": n, "filesize": f, "first": k} for u, n, f, k in entries],
            "rs_transfer": {"format": ours.get("format"), "labelled": ours.get("labelled"),
                            "label_counts": ours.get("label_counts"), "label_problem": ours.get("label_problem")}}


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
        sizes = np.array([entries[s]["nsamples"] for s in self.shard_numbers], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(sizes)])
        self.filesizes = [entries[s].get("filesize") for s in self.shard_numbers]
        self.first_keys = [entries[s].get("first") for s in self.shard_numbers]  # the first sample's key
        meta = index.get("rs_transfer") or {}
        self.labelled = bool(meta.get("labelled"))
        counts = meta.get("label_counts")
        self.label_counts = counts if shard_numbers is None else None  # of the whole split: for all its shards
        self.num_labels = len(counts) if counts else None  # labels indexed: 0..num_labels-1
        self.locality = int(max(1, sizes.mean() if len(sizes) else 1) * SHARDS_PER_BLOCK)
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
        ref = f"{self.paths[number].name}/{shard.keys[position]}"
        label = shard.read_label(position) if self.labelled else None
        if self.labelled and (label is None or label >= self.num_labels):
            raise DataError(f"tar shard {shard.path}: {shard.keys[position]} has label {label}, but "
                            f"{self.folder / INDEX_NAME} counted labels 0..{self.num_labels - 1}: the shards changed; "
                            f"rerun `rs-transfer index {self.folder}`")
        return ShardSample(ref, -1 if label is None else label, (str(shard.path), int(offset), int(size)))

    def __iter__(self):
        return (self[i] for i in range(len(self)))


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
    order = sorted(range(count), key=lambda s: str(images.paths[s].relative_to(images.folder)))
    permutation = np.random.default_rng(seed).permutation(count)
    minival = sorted(order[i] for i in permutation[:held])
    train = sorted(order[i] for i in permutation[held:])
    return images.subset(train), images.subset(minival)
