"""Pieces every downstream dataset shares: layout checks with clear errors, image reading, the paper's scale
jitter + crop + flip (torchvision transforms.v2, so masks, depth and boxes move with the image)
and padding collate. Moving batches to the device and splitting evaluation sets over ranks are the engine's
(engine/device.py, engine/loader.py).

Images stay uint8 until the model, which normalises them (less memory in the loader queues).
"""

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision import tv_tensors
from torchvision.transforms import v2

from rs_transfer.config import data_root
from rs_transfer.data.images import read_rgb8
from rs_transfer.data.text import read_lines
from rs_transfer.errors import DataError

IGNORE = 255  # label of pixels that count neither for the loss nor for mIoU


def find_dir(root, candidates: tuple, what: str) -> Path:
    """The first of `root/candidate` that exists; DataError listing every place looked at otherwise, ConfigError
    when `root` (data.root) is not set."""
    root = data_root(root, what)
    for candidate in candidates:
        path = root / candidate
        if path.is_dir():
            return path
    looked = ", ".join(str(root / c) for c in candidates)
    raise DataError(f"{what} not found under data.root={root}; looked for: {looked}")


def require(path: Path, expected: str) -> Path:
    if not path.exists():
        raise DataError(f"missing {path}: expected {expected}")
    return path


def read_text_lines(path: Path, expected: str) -> list:
    """The lines of a list file (UTF-8, an optional BOM, any line ending: see rs_transfer.data.text).

    Raises DataError naming `path` when it is missing or not UTF-8 text."""
    try:
        return read_lines(require(path, expected))
    except UnicodeDecodeError as error:
        raise DataError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start}): "
                           f"expected {expected}") from None


def read_split(path: Path, expected: str) -> list:
    """The first word of every non-blank line: image ids of a VOC ImageSets or SBD list."""
    ids = [line.split()[0] for line in read_text_lines(path, expected) if line.strip()]
    if not ids:
        raise DataError(f"{path} lists no images: expected {expected}")
    return ids


def read_image(path: Path) -> tv_tensors.Image:
    """uint8 3xHxW RGB of an image file of any mode (16-bit and float scaled, see rs_transfer.data.images).

    Raises DataError naming `path` when it is missing or cannot be decoded."""
    try:
        array = np.asarray(read_rgb8(require(path, "an image file")))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise DataError(f"cannot read image {path}: {error}") from None
    return tv_tensors.Image(torch.from_numpy(array.copy()).permute(2, 0, 1))


def read_label_png(path: Path) -> np.ndarray:
    """Class indices of a palette (VOC) or greyscale (ADE) PNG; the palette is ignored, the indices are the labels."""
    try:
        with Image.open(require(path, "a label PNG")) as image:
            if image.mode not in ("P", "L"):
                raise DataError(f"label {path} has mode {image.mode}: expected a palette (P) or greyscale (L) PNG")
            return np.array(image)
    except (UnidentifiedImageError, OSError) as error:
        raise DataError(f"cannot read label {path}: {error}") from None


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """uint8 class indices whose 0 means "unlabelled" (ADE20K's convention, mmsegmentation's reduce_zero_label):
    0 -> IGNORE, c -> c - 1, IGNORE stays IGNORE (a set's 255 outlines stay ignored)."""
    reduced = label - np.uint8(1)  # uint8 arithmetic wraps 0 - 1 to 255 = IGNORE
    reduced[label == IGNORE] = IGNORE
    return reduced


def read_label_png_reduced(path: Path) -> np.ndarray:
    """`read_label_png` then `reduce_zero_label`: ADE20K's labels, folder_seg's with task.reduce_zero_label."""
    return reduce_zero_label(read_label_png(path))


class ScaleJitter(v2.ScaleJitter):
    """torchvision's ScaleJitter (scale relative to the target size, as the TF detection/segmentation code does),
    except that labels and depth are resized with NEAREST_EXACT. torchvision resizes every mask with NEAREST,
    which samples at floor(i / r) and so shifts labels by up to half a source pixel against the bilinear image;
    NEAREST_EXACT samples at pixel centres, like the image. Boxes and images are resized as torchvision does."""

    def transform(self, inpt, params):
        if isinstance(inpt, tv_tensors.Mask):
            return self._call_kernel(v2.functional.resize, inpt, size=params["size"],
                                     interpolation=v2.InterpolationMode.NEAREST_EXACT)
        return super().transform(inpt, params)


def dense_train_transform(crop_size: int, scale_range, fill: dict) -> v2.Compose:
    """Scale jitter relative to the crop, a random crop padded with `fill` where the scaled image is smaller,
    and a horizontal flip."""
    return v2.Compose([
        ScaleJitter((crop_size, crop_size), scale_range=tuple(scale_range)),
        v2.RandomCrop(crop_size, pad_if_needed=True, fill=fill),
        v2.RandomHorizontalFlip(),
    ])


def pad_collate(samples: list, fills: dict) -> dict:
    """Stack dict samples, padding image-shaped entries at the bottom/right to the largest in the batch.

    fills: key -> padding value (images 0, labels IGNORE, depth 0 = invalid). Other keys are stacked or listed.
    """
    height = max(s["image"].shape[-2] for s in samples)
    width = max(s["image"].shape[-1] for s in samples)
    batch = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if key in fills:
            padded = [
                torch.nn.functional.pad(v.as_subclass(torch.Tensor), (0, width - v.shape[-1], 0, height - v.shape[-2]),
                                        value=fills[key])
                for v in values
            ]
            batch[key] = torch.stack(padded)
        elif isinstance(values[0], torch.Tensor):
            batch[key] = torch.stack([v.as_subclass(torch.Tensor) for v in values])
        else:
            batch[key] = values
    return batch
