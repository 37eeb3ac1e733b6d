"""Small generated datasets in the real on-disk formats, for the demo, the tests and `bench data`.

Each class has its own colour and stripe direction, plus noise, so a tiny network can learn it in a few steps.
"""

import io
import math
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def make_image(label: int, num_classes: int, size: tuple, rng: np.random.Generator) -> Image.Image:
    width, height = size
    hue = label / num_classes
    colour = np.array([math.cos(2 * math.pi * (hue + k / 3)) for k in range(3)]) * 90 + 128
    angle = math.pi * label / num_classes
    y, x = np.mgrid[0:height, 0:width]
    period = max(min(width, height) / 4, 4)
    stripes = np.sin(2 * math.pi * (x * math.cos(angle) + y * math.sin(angle)) / period)
    pixels = colour[None, None, :] + 50 * stripes[..., None] + rng.normal(0, 12, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG" if fmt == "jpg" else "PNG", **({"quality": 90} if fmt == "jpg" else {}))
    return buffer.getvalue()


def _sizes(rng, count: int, min_side: int, max_side: int) -> list:
    return [tuple(int(side) for side in rng.integers(min_side, max_side + 1, size=2)) for _ in range(count)]


def make_folder_dataset(root: str | Path, num_classes: int = 4, train_per_class: int = 20, val_per_class: int = 5,
                        min_side: int = 40, max_side: int = 80, seed: int = 0) -> Path:
    """ROOT/train/<class>/*.{jpg,png} and ROOT/val/<class>/*, odd sizes, JPEG and PNG mixed; returns ROOT."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for label in range(num_classes):
            folder = root / split / f"class_{label:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i, size in enumerate(_sizes(rng, per_class, min_side, max_side)):
                fmt = "png" if i % 3 == 2 else "jpg"
                image = make_image(label, num_classes, size, rng)
                (folder / f"{split}_{label}_{i:05d}.{fmt}").write_bytes(_encode(image, fmt))
    return root


def write_shards(folder: str | Path, samples: list, per_shard: int = 16, labelled: bool = True) -> list:
    """Write (key, PIL image, label) samples to FOLDER/shard-%05d.tar in webdataset layout; returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for start in range(0, len(samples), per_shard):
        path = folder / f"shard-{start // per_shard:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for key, image, label in samples[start:start + per_shard]:
                members = [(f"{key}.jpg", _encode(image, "jpg"))]
                if labelled:
                    members.append((f"{key}.cls", str(label).encode()))
                for name, payload in members:
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        paths.append(path)
    return paths


def make_shard_dataset(root: str | Path, num_classes: int = 4, train_per_class: int = 20, val_per_class: int = 5,
                       min_side: int = 40, max_side: int = 80, seed: int = 0, per_shard: int = 16) -> Path:
    """ROOT/train/shard-*.tar and ROOT/val/shard-*.tar (webdataset layout, class index in KEY.cls)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        samples = []
        for label in range(num_classes):
            for i, size in enumerate(_sizes(rng, per_class, min_side, max_side)):
                samples.append((f"{split}_{label:03d}_{i:05d}", make_image(label, num_classes, size, rng), label))
        write_shards(root / split, samples, per_shard)
    return root
