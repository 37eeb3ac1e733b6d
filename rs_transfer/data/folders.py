"""Class-folder datasets (ImageNet's and Kinetics' `SPLIT/<class>/<files>` layout): which folders are classes, and
which files of a folder are images."""

import functools
import logging
from pathlib import Path

from PIL import Image, ImageFile

from rs_transfer.errors import DataError

log = logging.getLogger(__name__)

# Data files lying directly in a split folder beside its class folders belong to no class. This many or fewer (and
# no more than STRAY_FRACTION of the sorted files) are strays, left out with a warning; more are a half-sorted split.
STRAY_LIMIT = 5
STRAY_FRACTION = 0.001

# Formats Pillow identifies but cannot decode by itself: stubs that need a handler registered from outside (BUFR,
# GRIB, HDF5; WMF/EMF outside Windows), MPEG, of which Pillow reads the size only, and EPS, which needs the
# Ghostscript program. A file of these in a class folder is not an image to train on.
UNDECODABLE_FORMATS = ("MPEG", "EPS")


def class_folders(split_dir: Path) -> list[str]:
    """The sorted names of the class folders in `split_dir`; hidden folders (.ipynb_checkpoints, .DS_Store-like
    tool folders) are left out. The sort order is the class index, as torchvision's ImageFolder and timm number
    them. Raises OSError (FileNotFoundError, NotADirectoryError) as `Path.iterdir` does: callers name the split."""
    return sorted(p.name for p in Path(split_dir).iterdir() if p.is_dir() and not p.name.startswith("."))


def find_classes(split_dir: Path, extensions) -> list[str]:
    """The sorted class folders of class-folder split `split_dir`. Raises DataError for a split without any, naming
    the data files (`extensions`) lying loose in it when it holds them (`check_sorted`)."""
    classes = class_folders(split_dir)
    if not classes:
        check_sorted(split_dir, extensions, 0)  # a flat folder of images: say how to sort it
        raise DataError(f"{split_dir} has no class sub-folders: expected {split_dir}/<class>/<image files>")
    return classes


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


def check_sorted(split_dir: Path, extensions, sorted_count: int, what: str = "images") -> None:
    """Check that the data files (`extensions`, lower case with the dot) of class-folder split `split_dir` are in
    its class folders, `sorted_count` of them. Files directly in `split_dir` belong to no class: a few strays
    (STRAY_LIMIT, STRAY_FRACTION) are left out with a warning naming them; more mean a split sorted only in part
    (an interrupted ImageNet valprep.sh leaves thousands beside the folders done) or not at all, whose evaluation
    would silently cover only the sorted part: raises DataError naming the count, the first files and the fix."""
    loose = sorted(p.name for p in Path(split_dir).iterdir()
                   if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in extensions)
    if not loose:
        return
    first = ", ".join(loose[:3]) + (", ..." if len(loose) > 3 else "")
    if len(loose) <= STRAY_LIMIT and len(loose) <= STRAY_FRACTION * sorted_count:
        log.warning("%s: %d %s lie beside the class folders, in no class, and are left out: %s", split_dir,
                    len(loose), what, first)
        return
    imagenet = " (ImageNet's validation images come as one flat folder: sort them with the devkit's ground truth, " \
        "e.g. the common valprep.sh or Kaggle's LOC_val_solution.csv)" if loose[0].startswith("ILSVRC2012_val_") else ""
    state = f"beside {sorted_count} sorted into class folders" if sorted_count else "and no class folder"
    raise DataError(f"{split_dir} holds {len(loose)} {what} directly in it, {state} ({first}): a class-folder split "
                    f"keeps each one in {split_dir}/<class>/; move them into their class folders{imagenet}, or out of "
                    f"{split_dir}")
