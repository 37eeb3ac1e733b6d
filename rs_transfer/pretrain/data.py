"""Image classification data for pretraining: ImageNet-layout folders and tar shards (webdataset layout).

Folders: `ROOT/train/<class>/*.{jpg,jpeg,png,...}` and `ROOT/val/<class>/*`, images of any size and PIL mode
(16-bit, palette, CMYK...: decoded to 8-bit RGB by rs_transfer.data.images); classes are the sorted sub-folder
names of `train/`. Shards: `ROOT/train/*.tar` (and `ROOT/val/*.tar`) in webdataset layout, i.e. members
`KEY.jpg` (or .jpeg/.png/.webp/.bmp) beside `KEY.cls` holding the class index as UTF-8 text. KEY follows
webdataset's rule, the member name up to the first dot of its file name, so `img.2021.05.01.jpg` is key `img`
with extension `2021.05.01.jpg`, not an image: such members are named in a warning, never dropped silently.

model.num_classes unset (None) is inferred from the training split: the class folders, or for shards the largest
label + 1 when no class below it lacks an image (`infer_num_classes`).

Shards are read as a map-style dataset (an index of member offsets, read by seek) rather than through
webdataset's streaming pipeline: the engine's DistributedSampler, per-epoch shuffling and exact mid-epoch
resume all need indexable samples, and seeking into an uncompressed tar is as cheap as opening a file.

An image that cannot be decoded is skipped: a warning names it, the next sample stands in so batches keep their
size, and `dataset.skipped` counts the skips of all DataLoader worker processes together.
"""

import logging
import multiprocessing
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from rs_transfer.data.images import decode_rgb8
from rs_transfer.data.text import ENCODING as TEXT_ENCODING
from rs_transfer.errors import UserError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
MAX_CONSECUTIVE_BAD = 16
NAMED_IN_WARNINGS = 5  # files named in a warning before "and N more"
WEBDATASET_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext: (key, extension)

class DataError(UserError):
    pass


@dataclass(frozen=True)
class Item:
    """One image: `ref` names it in warnings and pseudo-label files; `where` is a path or (tar, offset, size)."""

    ref: str
    label: int
    where: object


def find_classes(split_dir: Path) -> list:
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{split_dir} has no class sub-folders: expected {split_dir}/<class>/<image files>")
    return classes


def _first_names(names: list) -> str:
    shown = ", ".join(names[:NAMED_IN_WARNINGS])
    more = len(names) - NAMED_IN_WARNINGS
    return f"{shown} and {more} more" if more > 0 else shown


def _files_under(folder: Path) -> tuple:
    """(image files, other files) anywhere under `folder`, sorted. Hidden files that are not images (.DS_Store)
    are in neither list: they are not data, and naming them in warnings would only be noise."""
    images, others = [], []
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            images.append(path)
        elif not path.name.startswith("."):
            others.append(path)
    return images, others


def _warn_not_used(folder: Path, others: list, where: str) -> None:
    if others:
        log.warning("%s: %d files %s are not used (not %s): %s", folder, len(others), where,
                    "/".join(IMAGE_EXTENSIONS), _first_names([str(p.relative_to(folder)) for p in others]))


def scan_folder(split_dir: Path, classes: list) -> list:
    """Every image under `split_dir/<class>/`, labelled by the class's position in `classes`, in sorted order.

    Other files are named in one warning; raises DataError for a class folder not in `classes` or no image at all."""
    index = {name: i for i, name in enumerate(classes)}
    items, not_used = [], []
    for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if class_dir.name not in index:
            raise DataError(f"{class_dir}: class {class_dir.name!r} is not a class of the training split")
        images, others = _files_under(class_dir)
        items += [Item(str(path.relative_to(split_dir)), index[class_dir.name], str(path)) for path in images]
        not_used += others
    _warn_not_used(split_dir, not_used, "in class folders")
    if not items:
        raise DataError(f"{split_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)}) in its class sub-folders")
    return items


def list_images(path: Path) -> list:
    """Unlabelled images (label -1) for pseudo-labelling: a folder searched recursively, a .tar, or a folder of .tar."""
    if path.is_file() and path.suffix == ".tar":
        return scan_shards([path], labelled=False)
    if not path.is_dir():
        raise DataError(f"images not found: {path} (expected a folder of images, a .tar shard or a folder of shards)")
    shards = sorted(path.glob("*.tar"))
    if shards:
        return scan_shards(shards, labelled=False)
    images, others = _files_under(path)
    _warn_not_used(path, others, "in the image folder")
    if not images:
        raise DataError(f"{path} holds no images ({', '.join(IMAGE_EXTENSIONS)}) and no .tar shards")
    return [Item(str(p.relative_to(path)), -1, str(p)) for p in images]


def split_key(name: str) -> tuple:
    """(key, extension with its dot, lower case) of a tar member by webdataset's rule (`base_plus_ext`): the key
    is the path up to the first dot of the file name; ("", "") when the rule pairs it with nothing (no dot, or
    a file name starting with a dot)."""
    match = WEBDATASET_KEY.match(name)
    if match is None:
        return "", ""
    return match.group(1), "." + match.group(2).lower()


def scan_shards(shards: list, labelled: bool = True) -> list:
    """Index tar shards in webdataset layout: one image member per key, and a `KEY.cls` label when labelled.

    Members no indexed sample holds (a key without an image member, a name without a key, a link) are named in
    one warning per shard and counted in a last one; other fields of an indexed sample (KEY.json, ...) are not
    needed and pass quietly. Raises DataError for an unreadable shard, a key with two images or two labels, an
    image without its label, a label that is not an integer, or no image at all."""
    items, not_used, shards_not_used = [], 0, 0
    for shard in map(Path, shards):
        shard_items, unused = _scan_shard(shard, labelled)
        items += shard_items
        if unused:
            not_used += len(unused)
            shards_not_used += 1
            log.warning("tar shard %s: %d member(s) not used: %s (%s)", shard, len(unused), _first_names(unused),
                        _sample_rule(unused, labelled))
    if not_used:
        log.warning("%d member(s) of %d tar shard(s) were not used (named above)", not_used, shards_not_used)
    if not items:
        raise DataError(f"no images found in tar shards {', '.join(map(str, shards))}")
    return items


def _scan_shard(shard: Path, labelled: bool) -> tuple:
    """(items, names of the members not used, in tar order) of one shard."""
    images, labels, members = {}, {}, []  # key -> (member name, where); key -> (member name, bytes); (name, key)
    try:
        with tarfile.open(shard, "r:") as tar:
            for member in tar:
                if member.isdir():
                    continue
                key, ext = split_key(member.name) if member.isfile() else ("", "")
                members.append((member.name, key))
                if key and ext in IMAGE_EXTENSIONS:
                    if key in images:
                        raise DataError(f"tar shard {shard}: sample {key!r} holds two images, {images[key][0]} and "
                                        f"{member.name}: a sample has one image member")
                    images[key] = (member.name, (str(shard), member.offset_data, member.size))
                elif key and ext == ".cls" and labelled:
                    if key in labels:
                        raise DataError(f"tar shard {shard}: sample {key!r} holds two labels, {labels[key][0]} and "
                                        f"{member.name}")
                    labels[key] = (member.name, tar.extractfile(member).read())
    except (tarfile.TarError, OSError) as error:
        raise DataError(f"cannot read tar shard {shard}: {error} (shards must be uncompressed .tar)") from None
    items = [Item(f"{shard.name}/{key}", _shard_label(shard, key, labels) if labelled else -1, where)
             for key, (_, where) in sorted(images.items())]
    return items, [name for name, key in members if key not in images]


def _shard_label(shard: Path, key: str, labels: dict) -> int:
    if key not in labels:
        raise DataError(f"tar shard {shard}: image {key!r} has no {key}.cls label member")
    name, raw = labels[key]
    try:
        return int(raw.decode(TEXT_ENCODING).strip())  # a BOM or CRLF from a Windows tool is not part of the number
    except (UnicodeDecodeError, ValueError):
        raise DataError(f"tar shard {shard}: {name} holds {raw[:40]!r}, not a class index") from None


def _sample_rule(unused: list, labelled: bool) -> str:
    label = " with KEY.cls" if labelled else ""
    rule = (f"a sample is KEY{'|'.join(IMAGE_EXTENSIONS)}{label}, KEY being the member name up to the first dot "
            "of its file name (webdataset's rule)")
    example = next((name for name in unused if split_key(name)[0]), None)
    if example is None:
        return rule
    key, ext = split_key(example)
    return f"{rule}: {example!r} is key {key!r} with extension {ext[1:]!r}"


def load_split(root: str | Path, split: str, num_classes: Optional[int], classes: Optional[list] = None) -> tuple:
    """Items of ROOT/split (class folders or .tar shards) and the class names (None for shards).

    `classes` None: for folders this split defines them (the training split: its sorted class folders, and a
    folder without an image is named in a warning). `num_classes` set: folders must number exactly that many and
    shard labels lie in 0..num_classes-1; None: only negative labels are refused (see `infer_num_classes`).
    Raises DataError naming the split and the problem."""
    split_dir = Path(root) / split
    if not split_dir.is_dir():
        raise DataError(f"data split not found: {split_dir} (expected {Path(root)}/{split}/<class>/<images> or "
                        f"{Path(root)}/{split}/*.tar)")
    shards = sorted(split_dir.glob("*.tar"))
    if shards:
        items = scan_shards(shards, labelled=True)
        upper = num_classes if num_classes is not None else float("inf")
        bad = next((item for item in items if not 0 <= item.label < upper), None)
        if bad is not None:
            allowed = f"model.num_classes={num_classes}" if num_classes is not None else "0.. (class indices)"
            raise DataError(f"{split_dir}: {bad.ref} has label {bad.label}, outside {allowed}")
        return items, classes
    defines_classes = classes is None
    classes = classes or find_classes(split_dir)
    if num_classes is not None and len(classes) != num_classes:
        raise DataError(f"{split_dir} has {len(classes)} class folders but model.num_classes={num_classes}; "
                        f"set model.num_classes={len(classes)}")
    items = scan_folder(split_dir, classes)
    if defines_classes:
        _warn_empty_classes(split_dir, items, classes)
    return items, classes


def _warn_empty_classes(split_dir: Path, items: list, classes: list) -> None:
    # Such a class still gets an output: no image teaches it, so the model never predicts it.
    seen = {item.label for item in items}
    empty = [name for index, name in enumerate(classes) if index not in seen]
    if empty:
        log.warning("%s: %d class folder(s) hold no image (%s), so the model gets outputs it never learns: %s",
                    split_dir, len(empty), "/".join(IMAGE_EXTENSIONS), _first_names(empty))


def infer_num_classes(items: list, classes: Optional[list], split_dir: str | Path) -> int:
    """model.num_classes when it is not set, from the training split's `load_split` result: the number of class
    folders; for tar shards, which carry no class list, the largest label + 1, provided every class 0..max has an
    image. A gap is refused rather than guessed (labels counted from 1, or a subset of the classes, would give a
    head of the wrong size that nothing later notices): raises DataError asking to set model.num_classes."""
    if classes is not None:
        return len(classes)
    labels = {item.label for item in items}
    top = max(labels)
    missing = [str(c) for c in range(top + 1) if c not in labels]
    if missing:
        raise DataError(f"{split_dir}: tar shards have labels {min(labels)}..{top} but no image of class "
                        f"{_first_names(missing)}; set model.num_classes (shards carry no class list, and a gap "
                        "may mean labels counted from 1 or a subset of the classes)")
    return top + 1


def minival_split(items: list, fraction: float, seed: int) -> tuple:
    """Hold out `fraction` of the training items (the paper's minival: 2%), the same ones on every run and rank.

    A seeded permutation of the sorted item list: the split depends only on the file names and the seed.
    """
    if not 0 < fraction < 1:
        raise DataError(f"data.minival_fraction must be in (0, 1), got {fraction}")
    order = sorted(range(len(items)), key=lambda i: items[i].ref)
    generator = torch.Generator().manual_seed(seed)
    permutation = torch.randperm(len(items), generator=generator).tolist()
    held = max(1, round(len(items) * fraction))
    minival = sorted(order[i] for i in permutation[:held])
    train = sorted(order[i] for i in permutation[held:])
    return [items[i] for i in train], [items[i] for i in minival]


def read_bytes(where) -> bytes:
    if isinstance(where, str):
        with open(where, "rb") as file:
            return file.read()
    shard, offset, size = where
    with open(shard, "rb") as file:
        file.seek(offset)
        return file.read(size)


def decode(data: bytes) -> Image.Image:
    """8-bit RGB of any image mode (16-bit, float, palette, CMYK...: see rs_transfer.data.images); the full decode
    happens here, so a truncated file fails here."""
    return decode_rgb8(data)


def describe_error(error: Exception) -> str:
    if isinstance(error, UnidentifiedImageError):  # its message shows a BytesIO repr, not the file
        return "unknown image format"
    return f"{type(error).__name__}: {error}"


class ImageDataset(Dataset):
    """Decoded, transformed images with their labels (or with `targets[i]` when given, e.g. soft pseudo-labels)."""

    def __init__(self, items: list, transform: Optional[Callable] = None, targets: Optional[list] = None):
        self.items = items
        self.transform = transform
        self.targets = targets
        # Shared memory: DataLoader workers receive it when they start (fork or spawn), so their skips add up.
        self._skipped = multiprocessing.Value("q", 0)

    @property
    def skipped(self) -> int:
        return self._skipped.value

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        image, index = self.load(index)
        if self.transform is not None:
            image = self.transform(image)
        target = self.targets[index] if self.targets is not None else self.items[index].label
        return image, target

    def load(self, index: int) -> tuple:
        """The decoded image at `index`, or at the next readable index; returns (image, index used)."""
        for attempt in range(MAX_CONSECUTIVE_BAD):
            i = (index + attempt) % len(self.items)
            item = self.items[i]
            try:
                return decode(read_bytes(item.where)), i
            except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
                log.warning("skipping unreadable image %s (%s) [pid %d]", item.ref, describe_error(error), os.getpid())
                with self._skipped.get_lock():
                    self._skipped.value += 1
        raise DataError(f"{MAX_CONSECUTIVE_BAD} unreadable images in a row from {self.items[index].ref}: "
                        "is the data corrupt?")


def collate(batch: list) -> dict:
    images = torch.stack([image for image, _ in batch])
    targets = [target for _, target in batch]
    if isinstance(targets[0], torch.Tensor):
        return {"image": images, "target": torch.stack(targets)}
    return {"image": images, "label": torch.tensor(targets, dtype=torch.long)}
