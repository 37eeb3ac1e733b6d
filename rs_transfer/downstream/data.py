"""Pieces every downstream dataset shares to find and read its files: layout checks with clear errors, image and
label reading. The augmentations and the padding collate are downstream/transforms.py; moving batches to the device
and splitting evaluation sets over ranks are the engine's (engine/device.py, engine/loader.py).

Importing this module imports no torch (a task's data layout is checked before torch is loaded); `read_image`
imports it when called.

Images stay uint8 until the model, which normalises them (less memory in the loader queues).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

from rs_transfer.config import data_root
from rs_transfer.data.images import read_rgb8
from rs_transfer.data.text import read_lines
from rs_transfer.errors import DataError

if TYPE_CHECKING:
    from torchvision import tv_tensors

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
    import torch
    from torchvision import tv_tensors

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
