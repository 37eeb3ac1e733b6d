"""Image classification data for pretraining: ImageNet-layout folders and tar shards (webdataset layout).

Folders: `ROOT/train/<class>/*.{jpg,jpeg,png,...}` and `ROOT/val/<class>/*`, images of any size; classes are the
sorted sub-folder names of `train/`. Shards: `ROOT/train/*.tar` (and `ROOT/val/*.tar`) in webdataset layout,
i.e. members `KEY.jpg` (or .jpeg/.png/.webp) beside `KEY.cls` holding the class index as text.

Shards are read as a map-style dataset (an index of member offsets, read by seek) rather than through
webdataset's streaming pipeline: the engine's DistributedSampler, per-epoch shuffling and exact mid-epoch
resume all need indexable samples, and seeking into an uncompressed tar is as cheap as opening a file.

An image that cannot be decoded is skipped: a warning names it, the next sample stands in so batches keep their
size, and `dataset.skipped` counts the skips of all DataLoader worker processes together.
"""

import io
import logging
import multiprocessing
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from rs_transfer.errors import UserError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
MAX_CONSECUTIVE_BAD = 16

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


def scan_folder(split_dir: Path, classes: list) -> list:
    """Every image under `split_dir/<class>/`, labelled by the class's position in `classes`, in sorted order."""
    index = {name: i for i, name in enumerate(classes)}
    items = []
    for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if class_dir.name not in index:
            raise DataError(f"{class_dir}: class {class_dir.name!r} is not a class of the training split")
        for path in sorted(class_dir.rglob("*")):
            if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
                items.append(Item(str(path.relative_to(split_dir)), index[class_dir.name], str(path)))
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
    items = [
        Item(str(p.relative_to(path)), -1, str(p))
        for p in sorted(path.rglob("*"))
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
    ]
    if not items:
        raise DataError(f"{path} holds no images ({', '.join(IMAGE_EXTENSIONS)}) and no .tar shards")
    return items


def scan_shards(shards: list, labelled: bool = True) -> list:
    """Index tar shards in webdataset layout: one image member per key, and a `KEY.cls` label when labelled."""
    items = []
    for shard in shards:
        images, labels = {}, {}
        try:
            with tarfile.open(shard, "r:") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    key, _, ext = _split_key(member.name)
                    if ext in IMAGE_EXTENSIONS:
                        images[key] = (str(shard), member.offset_data, member.size)
                    elif ext == ".cls" and labelled:
                        labels[key] = tar.extractfile(member).read().decode().strip()
        except (tarfile.TarError, OSError) as error:
            raise DataError(f"cannot read tar shard {shard}: {error} (shards must be uncompressed .tar)") from None
        for key in sorted(images):
            label = -1
            if labelled:
                if key not in labels:
                    raise DataError(f"tar shard {shard}: image {key!r} has no {key}.cls label member")
                try:
                    label = int(labels[key])
                except ValueError:
                    raise DataError(f"tar shard {shard}: {key}.cls holds {labels[key]!r}, not a class index") from None
            items.append(Item(f"{Path(shard).name}/{key}", label, images[key]))
    if not items:
        raise DataError(f"no images found in tar shards {', '.join(map(str, shards))}")
    return items


def _split_key(name: str) -> tuple:
    # webdataset: the key is everything up to the first dot of the file name; the rest is the extension.
    directory, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), dot, "." + ext.lower() if dot else ""


def load_split(root: str | Path, split: str, num_classes: int, classes: Optional[list] = None) -> tuple:
    """Items of ROOT/split (class folders or .tar shards) and the class names (None for shards)."""
    split_dir = Path(root) / split
    if not split_dir.is_dir():
        raise DataError(f"data split not found: {split_dir} (expected {Path(root)}/{split}/<class>/<images> or "
                        f"{Path(root)}/{split}/*.tar)")
    shards = sorted(split_dir.glob("*.tar"))
    if shards:
        items = scan_shards(shards, labelled=True)
        bad = next((item for item in items if not 0 <= item.label < num_classes), None)
        if bad is not None:
            raise DataError(f"{split_dir}: {bad.ref} has label {bad.label}, outside model.num_classes={num_classes}")
        return items, classes
    classes = classes or find_classes(split_dir)
    if len(classes) != num_classes:
        raise DataError(f"{split_dir} has {len(classes)} class folders but model.num_classes={num_classes}; "
                        f"set model.num_classes={len(classes)}")
    return scan_folder(split_dir, classes), classes


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
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")  # forces the full decode, so a truncated file fails here


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
