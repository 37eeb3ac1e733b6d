"""Class-folder datasets (ImageNet's and Kinetics' `SPLIT/<class>/<files>` layout): which folders are classes, and
which files of a folder are images."""

import functools
from pathlib import Path

from PIL import Image, ImageFile

# Formats Pillow identifies but cannot decode by itself: stubs that need a handler registered from outside (BUFR,
# GRIB, HDF5; WMF/EMF outside Windows), MPEG, of which Pillow reads the size only, and EPS, which needs the
# Ghostscript program. A file of these in a class folder is not an image to train on.
UNDECODABLE_FORMATS = ("MPEG", "EPS")


def class_folders(split_dir: Path) -> list[str]:
    """The sorted names of the class folders in `split_dir`; hidden folders (.ipynb_checkpoints, .DS_Store-like
    tool folders) are left out. The sort order is the class index, as torchvision's ImageFolder and timm number
    them. Raises OSError (FileNotFoundError, NotADirectoryError) as `Path.iterdir` does: callers name the split."""
    return sorted(p.name for p in Path(split_dir).iterdir() if p.is_dir() and not p.name.startswith("."))


@functools.cache
def image_extensions() -> frozenset[str]:
    """The file extensions (lower case, with the dot) of every format this Pillow can open and decode: what
    `Image.registered_extensions()` lists, less the save-only formats (PDF, Palm), stubs and
    UNDECODABLE_FORMATS. MPO (multi-picture JPEG) counts: the JPEG plugin opens it."""
    def decodes(fmt: str) -> bool:
        if fmt == "MPO":
            return True
        if fmt not in Image.OPEN or fmt in UNDECODABLE_FORMATS:
            return False
        factory = Image.OPEN[fmt][0]
        return not (isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile))

    return frozenset(ext.lower() for ext, fmt in Image.registered_extensions().items() if decodes(fmt))


def list_files(folder: Path, extensions, skip_hidden: bool = False) -> tuple[list[Path], list[Path]]:
    """(image files, other files) anywhere under `folder`, each list sorted. A file is an image when its extension,
    in any case, is in `extensions` (lower case, with the dot). Hidden files that are not images (.DS_Store) are in
    neither list: they are not data, and naming them in warnings would only be noise. With `skip_hidden` nothing
    below a hidden name is in either list, images included: macOS's `._photo.jpg` (AppleDouble metadata, not a JPEG)
    and `.ipynb_checkpoints/` copies are not data either."""
    images, others = [], []
    for path in sorted(Path(folder).rglob("*")):
        if not path.is_file():
            continue
        if skip_hidden and any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue
        if path.suffix.lower() in extensions:
            images.append(path)
        elif not path.name.startswith("."):
            others.append(path)
    return images, others
