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

import hashlib
import logging
import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from rs_transfer.data import folders
from rs_transfer.data.folders import check_sorted, list_files
from rs_transfer.data.images import decode_rgb8
from rs_transfer.errors import DataError
from rs_transfer.pretrain import shards

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
MAX_CONSECUTIVE_BAD = 16


@dataclass(frozen=True)
class Item:
    """One image: `ref` names it in warnings and pseudo-label files; `where` is a path or (tar, offset, size)."""

    ref: str
    label: int
    where: object


def find_classes(split_dir: Path) -> list:
    """The sorted class folders of `split_dir` (data.folders.find_classes with pretraining's IMAGE_EXTENSIONS)."""
    return folders.find_classes(split_dir, IMAGE_EXTENSIONS)


def _files_under(folder: Path) -> tuple:
    """(image files, other files) anywhere under `folder`, sorted (data.folders.list_files with IMAGE_EXTENSIONS)."""
    return list_files(folder, IMAGE_EXTENSIONS)


def _warn_not_used(folder: Path, others: list, where: str) -> None:
    if others:
        log.warning("%s: %d files %s are not used (not %s): %s", folder, len(others), where,
                    "/".join(IMAGE_EXTENSIONS), shards.first_names([str(p.relative_to(folder)) for p in others]))


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
    check_sorted(split_dir, IMAGE_EXTENSIONS, len(items))
    if not items:
        raise DataError(f"{split_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)}) in its class sub-folders")
    return items


def list_images(path: Path):
    """Unlabelled images for pseudo-labelling, as a sequence of items: a folder searched recursively (a list,
    label -1), or a .tar or a folder of .tar (ShardImages, read on demand; FOLDER/index.json used when there)."""
    if path.is_file() and path.suffix == ".tar":
        return scan_shards([path], labelled=False)
    if not path.is_dir():
        raise DataError(f"images not found: {path} (expected a folder of images, a .tar shard or a folder of shards)")
    if any(path.glob("*.tar")):
        return shards.open_split(path)
    images, others = _files_under(path)
    _warn_not_used(path, others, "in the image folder")
    if not images:
        raise DataError(f"{path} holds no images ({', '.join(IMAGE_EXTENSIONS)}) and no .tar shards")
    return [Item(str(p.relative_to(path)), -1, str(p)) for p in images]


def split_key(name: str) -> tuple:
    """(key, extension with its dot, lower case) of a tar member by webdataset's rule (see shards.split_key)."""
    return shards.split_key(name)


def scan_shards(paths: list, labelled: bool = True) -> shards.ShardImages:
    """The samples of these tar shards in webdataset layout, as a ShardImages sequence (shards.py: one scan,
    warnings for members no sample holds). Raises DataError for an unreadable shard, a key with two images or
    two labels, an image without its label when `labelled`, a label that is not an integer, or no image."""
    paths = [Path(p) for p in paths]
    folder = paths[0].parent
    index = shards.describe(folder, paths)
    images = shards.ShardImages(folder, index)
    if labelled:
        _check_labelled(images, folder)
    return images


def _check_labelled(images: shards.ShardImages, where: Path) -> None:
    meta = images.index.get("rs_transfer") or {}
    if meta.get("format") is None:
        raise DataError(f"{where}/{shards.INDEX_NAME} has no \"rs_transfer\" entry (labels and their counts): it was "
                        f"not written by `rs-transfer index`; rerun `rs-transfer index {where}`")
    if not images.labelled:
        raise DataError(f"{where}: {meta.get('label_problem') or 'images without a label'}: a training split of tar "
                        "shards needs KEY.cls (the class index) beside every image")


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
    if any(split_dir.glob("*.tar")):
        images = shards.open_split(split_dir)
        _check_labelled(images, split_dir)
        counts = images.label_counts or []
        if num_classes is not None and len(counts) > num_classes:
            raise DataError(f"{split_dir}: images have labels up to {len(counts) - 1}, outside "
                            f"model.num_classes={num_classes}")
        if num_classes is not None and split == "train":
            empty = [str(c) for c in range(num_classes) if c >= len(counts) or not counts[c]]
            if empty:  # as for class folders: such a class gets an output no image teaches
                log.warning("%s: %d class(es) of model.num_classes=%d have no image, so the model gets outputs it "
                            "never learns: %s", split_dir, len(empty), num_classes, shards.first_names(empty))
        return images, classes
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
                    split_dir, len(empty), "/".join(IMAGE_EXTENSIONS), shards.first_names(empty))


def infer_num_classes(items: list, classes: Optional[list], split_dir: str | Path) -> int:
    """model.num_classes when it is not set, from the training split's `load_split` result: the number of class
    folders; for tar shards, which carry no class list, the largest label + 1, provided every class 0..max has an
    image. A gap is refused rather than guessed (labels counted from 1, or a subset of the classes, would give a
    head of the wrong size that nothing later notices): raises DataError asking to set model.num_classes."""
    if classes is not None:
        return len(classes)
    counts = getattr(items, "label_counts", None)
    labels = {c for c, n in enumerate(counts) if n} if counts is not None else {item.label for item in items}
    top = max(labels)
    missing = [str(c) for c in range(top + 1) if c not in labels]
    if missing:
        raise DataError(f"{split_dir}: tar shards have labels {min(labels)}..{top} but no image of class "
                        f"{shards.first_names(missing)}; set model.num_classes (shards carry no class list, and a gap "
                        "may mean labels counted from 1 or a subset of the classes)")
    return top + 1


def minival_split(items: list, fraction: float, seed: int) -> tuple:
    """Hold out `fraction` of the training items (the paper's minival: 2%), the same ones on every run and rank.

    A seeded permutation of the sorted item list: the split depends only on the file names and the seed.
    """
    if not 0 < fraction < 1:
        raise DataError(f"data.minival_fraction must be in (0, 1), got {fraction}")
    if isinstance(items, shards.ShardImages):
        return shards.minival_shards(items, fraction, seed)
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

    @property
    def locality(self) -> int:
        """Consecutive samples an epoch should shuffle together (tar shards, see shards.py); 0: any order."""
        return getattr(self.items, "locality", 0)

    def __getitem__(self, index: int):
        # A transform that decodes by itself (transforms.DecodingTransform, data.fast_decode) gets the bytes: it
        # draws the crop from the header, then decodes only as much of the JPEG as the crop needs.
        decoding = getattr(self.transform, "decode", None)
        image, index = self.load(index, decoding or decode)
        if self.transform is not None:
            image = (self.transform.augment if decoding else self.transform)(image)
        target = self.targets[index] if self.targets is not None else self.items[index].label
        return image, target

    def load(self, index: int, decoder: Callable = decode) -> tuple:
        """`decoder(bytes)` (the decoded image) at `index`, or at the next readable index; returns (image, index
        used)."""
        for attempt in range(MAX_CONSECUTIVE_BAD):
            i = (index + attempt) % len(self.items)
            item = self.items[i]
            try:
                return decoder(read_bytes(item.where)), i
            except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
                log.warning("skipping unreadable image %s (%s) [pid %d]", item.ref, describe_error(error), os.getpid())
                with self._skipped.get_lock():
                    self._skipped.value += 1
        raise DataError(f"{MAX_CONSECUTIVE_BAD} unreadable images in a row from {self.items[index].ref}: "
                        "is the data corrupt?")


def image_set_digest(images) -> str:
    """A SHA-256 naming an image set's content as listed: for shards their names, sample counts, byte sizes and
    first keys (from index.json: no shard is read), for a folder its image paths. Pseudo-labels record it, so
    labels are never joined to images that changed (shards replaced in place must be indexed again)."""
    digest = hashlib.sha256()
    if isinstance(images, shards.ShardImages):
        for path, start, stop, size, first in zip(images.paths, images.starts[:-1], images.starts[1:],
                                                  images.filesizes, images.first_keys):
            digest.update(f"{path.name}\t{stop - start}\t{size}\t{first}\n".encode())
    else:
        for item in images:
            digest.update(f"{item.ref}\n".encode())
    return digest.hexdigest()


class EncodedImages:
    """`read(index)` -> (encoded image bytes, label) of a sequence of items: what a loader that decodes by itself
    (DALI) reads. Picklable, for loader processes."""

    def __init__(self, items):
        self.items = items

    def __call__(self, index: int) -> tuple:
        item = self.items[index]
        return read_bytes(item.where), item.label

    def ref(self, index: int) -> str:
        """The image's name in messages: its path under the split, or SHARD/KEY."""
        return self.items[index].ref


def collate(batch: list) -> dict:
    images = torch.stack([image for image, _ in batch])
    targets = [target for _, target in batch]
    if isinstance(targets[0], torch.Tensor):
        return {"image": images, "target": torch.stack(targets)}
    return {"image": images, "label": torch.tensor(targets, dtype=torch.long)}
