"""Images of any PIL mode as 8-bit RGB: the one decode every RGB image reader uses (pretraining folders and
shards, pseudo-labelling, every downstream dataset). Label PNGs (class indices) and depth PNGs (millimetres) are
not images in this sense and keep their raw values; their readers must not come here.

PIL's own `convert("RGB")` clips instead of scaling: a 16-bit PNG (0..65535) comes out almost white, and a
float image in [0, 1] almost black. It also warns on palette images whose transparency is a byte table. Float
images have no agreed range (scientific TIFFs hold [0, 1], many converted photos 0..255), so their largest value
tells which they hold. Here:

| mode | becomes |
|---|---|
| RGB, L, 1, CMYK, YCbCr, HSV | PIL's conversion (1: 0/255; L: grey) |
| RGBA, RGBX, LA, PA, P (with or without transparency) | colour kept, alpha dropped (not composited on a background) |
| RGBa, La (premultiplied alpha) | un-premultiplied first, then alpha dropped |
| I;16, I;16B, I;16L, I;16N (16-bit grey) | value / 257 rounded: 0 -> 0, 65535 -> 255 |
| I (32-bit signed int) | 16-bit data, like I;16 (16-bit PNGs open as I in some Pillow versions); clipped to 0..65535 |
| F (32-bit float) | largest value <= 1: [0, 1] data, value * 255; else 0..255 data as it is; rounded, clipped; NaN -> 0 |
| LAB | CIE L*a*b* to sRGB through littleCMS (ImageCms, shipped with Pillow) |
"""

import io
from pathlib import Path

import numpy as np
from PIL import Image

SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
SIXTEEN_BIT_MAX = 65535
UNIT_FLOAT_MAX = 1.0  # an F image whose values all lie at or below this holds [0, 1]; otherwise 0..255
ALPHA_FIRST = ("PA", "RGBa")  # modes PIL turns into RGB correctly only through RGBA


def to_rgb8(image: Image.Image) -> Image.Image:
    """A new 8-bit RGB image (mode "RGB", same width x height) with the colours of `image`, any PIL mode.

    Decodes the whole image, so a truncated file fails here: raises what PIL raises for unreadable data
    (OSError, ValueError, SyntaxError, Image.DecompressionBombError), and ValueError for a mode PIL cannot convert.
    """
    mode = image.mode
    if mode in SIXTEEN_BIT_MODES or mode == "I":
        return _grey_to_rgb8(np.asarray(image, dtype=np.float64) * (255 / SIXTEEN_BIT_MAX))
    if mode == "F":
        return _grey_to_rgb8(_float_to_0_255(np.asarray(image, dtype=np.float64)))
    if mode == "LAB":
        return _lab_to_rgb8(image)
    if mode == "La":
        image = image.convert("LA")  # PIL divides by alpha here; it has no La -> RGB conversion
    elif mode in ALPHA_FIRST or (mode == "P" and "transparency" in image.info):
        # Straight through RGBA: PIL warns on a P -> RGB conversion when the transparency is a byte table.
        image = image.convert("RGBA")
    return image.convert("RGB")


def decode_rgb8(data: bytes) -> Image.Image:
    """The encoded image `data` (JPEG, PNG, WebP, ...) as 8-bit RGB; raises as `to_rgb8`."""
    with Image.open(io.BytesIO(data)) as image:
        return to_rgb8(image)


def read_rgb8(path: str | Path) -> Image.Image:
    """The image file at `path` as 8-bit RGB; raises as `to_rgb8` (FileNotFoundError when it does not exist)."""
    with Image.open(path) as image:
        return to_rgb8(image)


def _float_to_0_255(values: np.ndarray) -> np.ndarray:
    """Float intensities on the 0..255 scale: [0, 1] data (largest value <= 1) is scaled by 255, other data is taken
    as 0..255 already (the caller clips). NaN becomes 0 and does not count towards the largest value."""
    values = np.nan_to_num(values, nan=0.0)
    return values * 255 if values.size and values.max() <= UNIT_FLOAT_MAX else values


def _grey_to_rgb8(values: np.ndarray) -> Image.Image:
    grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")  # mode L from a 2-D uint8 array


def _lab_to_rgb8(image: Image.Image) -> Image.Image:
    try:
        from PIL import ImageCms
    except ImportError:  # a Pillow built without littleCMS
        raise ValueError("a LAB image needs Pillow with littleCMS (PIL.ImageCms) to become RGB") from None
    transform = ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB")
    return ImageCms.applyTransform(image, transform)
