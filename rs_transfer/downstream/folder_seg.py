"""The folder_seg task: semantic segmentation of the user's own image/mask folders (mmsegmentation's layout), mIoU
and per-class IoU. The readers and the checks of the user's masks live here; the dataset, model, evaluator and
predictor are the ones pascal_seg and ade_seg use (rs_transfer/downstream/segmentation.py).

Layout (data.root): images/<split>/NAME.<ext> (any Pillow-readable image, extension in any case, subfolders
allowed), masks/<split>/NAME.png (mode L or P, pixel = class index, 255 = ignore; a P mask's palette is ignored),
splits task.train_split and task.val_split (train, val), and optionally classes.txt (one class name per line, in
index order). With task.reduce_zero_label (ADE20K's convention), mask 0 is "unlabelled" (ignored) and mask c is
class c - 1; classes.txt then names mask values 1, 2, ...

At build every mask of both splits is read once (its mode, size and which values it holds; one mask in memory at
a time) to infer the classes and to turn the known ways of training to a silent mIoU of 0 into errors naming the
files: colour (RGB) masks, a value beyond the classes, binary masks saved as 0/255 (255 is ignore) or 0/1 when
more classes are declared, images and masks that do not pair up. The classes found are written into the run's
config (task.class_names, model.num_classes), so `predict` and `export` need only the run folder.
"""

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, UnidentifiedImageError

from rs_transfer.config import ConfigError, data_root, record_inferred
from rs_transfer.data.folders import image_extensions, list_files
from rs_transfer.downstream import segmentation
from rs_transfer.downstream.config import DenseSection, FinetuneConfig, check_num_classes
from rs_transfer.downstream.data import IGNORE, read_label_png, read_label_png_reduced, read_text_lines
from rs_transfer.downstream.protocol import Protocol
from rs_transfer.downstream.registry import TransferTaskDeclaration
from rs_transfer.downstream.scenes import outlines, scene, voc_palette
from rs_transfer.downstream.segmentation import METRIC, build_segmentation
from rs_transfer.errors import DataError

log = logging.getLogger(__name__)

CLASSES_FILE = "classes.txt"
MASK_SUFFIX = ".png"
MASK_MODES = ("L", "P")
SHOWN = 5  # file stems and class names an error or log line lists before "..."
LAYOUT = "images/<split>/ and masks/<split>/ (folder_seg)"  # what data.root holds, for its errors

# The VOC segmentation protocol (the paper's Table 5 column for segmentation); not a paper task, so no paper numbers.
PROTOCOL = Protocol(METRIC, (5000, 10000, 20000), 64, 512, "own seg mIoU")


@dataclass
class FolderSegSection(DenseSection):
    name: str = "folder_seg"
    train_split: str = "train"  # images/<split>/ and masks/<split>/
    val_split: str = "val"
    # None: from data.root/classes.txt, else named after the mask values (class_0, class_1, ...); filled at build
    class_names: Optional[list] = None
    reduce_zero_label: bool = False  # mask 0 = unlabelled (ignored), mask c = class c - 1 (ADE20K's convention)


@dataclass
class FolderSegConfig(FinetuneConfig):
    task: FolderSegSection = field(default_factory=FolderSegSection)


def _first(stems) -> str:
    stems = sorted(stems)
    return ", ".join(stems[:SHOWN]) + (", ..." if len(stems) > SHOWN else "")


def split_dir(root: Path, kind: str, split: str, expected: str) -> Path:
    """data.root/<kind>/<split>; DataError naming it and the folders data.root does hold when it is missing."""
    folder = root / kind / split
    if not folder.is_dir():
        held = sorted(p.name + "/" for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        raise DataError(f"missing {folder}: expected {expected} (layout: data.root/images/<split>/NAME.<ext> and "
                        f"data.root/masks/<split>/NAME.png); data.root holds {', '.join(held) or 'no folders'}")
    return folder


def _by_stem(folder: Path, files: list, what: str) -> dict:
    """NAME (the path below `folder` without its suffix) -> file; DataError for two files of one NAME."""
    found = {}
    for path in files:
        stem = path.relative_to(folder).with_suffix("").as_posix()
        if stem in found:
            raise DataError(f"{found[stem]} and {path} are two {what} for {stem}: keep one")
        found[stem] = path
    return found


def image_files(folder: Path) -> dict:
    """NAME -> image file of `folder`: every file with a suffix Pillow decodes (any case, data.folders.list_files:
    hidden files and folders left out); other files are skipped."""
    images, others = list_files(folder, image_extensions(), skip_hidden=True)
    if others:
        log.info("%s: %d files that are not images skipped", folder, len(others))
    return _by_stem(folder, images, "images")


def mask_files(folder: Path) -> dict:
    """NAME -> mask file of `folder`: NAME.png (any case). Raises DataError for a mask saved in another image format
    (JPEG changes the indices at every edge); files that are not images are skipped."""
    images, _ = list_files(folder, image_extensions(), skip_hidden=True)
    for path in images:
        if path.suffix.lower() != MASK_SUFFIX:
            lossy = " (JPEG compression changes the class indices along every edge)" if path.suffix.lower() in (
                ".jpg", ".jpeg", ".jfif", ".jpe") else ""
            raise DataError(f"mask {path} is a {path.suffix} file{lossy}: masks must be PNG files of class "
                            "indices, masks/<split>/NAME.png")
    return _by_stem(folder, [p for p in images if p.suffix.lower() == MASK_SUFFIX], "masks")


def split_dirs(root: Path, split: str) -> tuple:
    """(images/<split>, masks/<split>) of data.root `root`; DataError naming the first missing (`split_dir`)."""
    return (split_dir(root, "images", split, "the split's images, NAME.<ext>"),
            split_dir(root, "masks", split, "the split's masks, NAME.png"))


def pair_split(root, split: str) -> list:
    """[(image path, mask path)] of a split, sorted by NAME. Raises DataError naming the folders for a missing
    folder, a split without images, or images without masks and masks without images (counts, first NAMEs)."""
    images_dir, masks_dir = split_dirs(data_root(root, LAYOUT), split)
    images, masks = image_files(images_dir), mask_files(masks_dir)
    if not images:
        raise DataError(f"no images in {images_dir}: expected NAME.<ext> files Pillow reads (.jpg, .png, ...)")
    lone_images, lone_masks = images.keys() - masks.keys(), masks.keys() - images.keys()
    if lone_images or lone_masks:
        problems = []
        if lone_images:
            problems.append(f"{len(lone_images)} of {len(images)} images in {images_dir} have no mask NAME.png in "
                            f"{masks_dir} (first: {_first(lone_images)})")
        if lone_masks:
            problems.append(f"{len(lone_masks)} of {len(masks)} masks in {masks_dir} have no image in {images_dir} "
                            f"(first: {_first(lone_masks)})")
        raise DataError("; ".join(problems) + ": every image needs its mask of the same NAME")
    return [(images[stem], masks[stem]) for stem in sorted(images)]


def mask_values(image_path: Path, mask_path: Path) -> np.ndarray:
    """bool (256,): which values `mask_path` holds. Reads the image's header only (its size). Raises DataError
    naming the file for an unreadable file, a colour or other non-index mask, or a mask of another size."""
    try:
        with Image.open(mask_path) as mask:
            if mask.mode in ("RGB", "RGBA"):
                raise DataError(f"masks must hold class indices (mode L or P), {mask_path} is {mask.mode}: convert "
                                "your colour masks to indices (one value per class, 255 = ignore)")
            if mask.mode not in MASK_MODES:
                raise DataError(f"masks must hold class indices (mode L or P), {mask_path} is {mask.mode}: save it "
                                "as an 8-bit greyscale (L) or palette (P) PNG")
            values = np.asarray(mask)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise DataError(f"cannot read mask {mask_path}: {error}") from None
    try:
        with Image.open(image_path) as image:
            size = image.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise DataError(f"cannot read image {image_path}: {error}") from None
    if size != (values.shape[1], values.shape[0]):
        raise DataError(f"mask {mask_path} is {values.shape[1]}x{values.shape[0]} (width x height), image "
                        f"{image_path} is {size[0]}x{size[1]}: a mask has its image's size")
    return np.bincount(values.ravel(), minlength=256) > 0


@dataclass
class MaskScan:
    """What one pass over the masks found: constant memory whatever the number of masks."""

    seen: np.ndarray  # bool (256,): the raw mask values present in any mask
    first: dict  # raw value -> the first mask (in split, NAME order) holding it
    masks: int


def scan_masks(pairs: list) -> MaskScan:
    """Read every mask of `pairs` [(image, mask)] once (`mask_values`)."""
    seen, first = np.zeros(256, dtype=bool), {}
    for image_path, mask_path in pairs:
        values = mask_values(image_path, mask_path)
        for value in np.flatnonzero(values & ~seen).tolist():
            first[value] = mask_path
        seen |= values
    return MaskScan(seen=seen, first=first, masks=len(pairs))


def read_classes_file(path: Path) -> list | None:
    """The class names of data.root/classes.txt (one per line, index order; trailing blank lines and spaces around
    a name dropped), or None without the file. Raises DataError naming it for a blank line between names, a
    repeated name, or no name."""
    if not path.is_file():
        return None
    lines = [line.strip() for line in read_text_lines(path, "one class name per line, in index order")]
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise DataError(f"{path} names no class: expected one class name per line, in index order")
    if "" in lines:
        raise DataError(f"{path} line {lines.index('') + 1} is blank: line i names class i - 1 (mask value i - 1), "
                        "so every line up to the last names a class")
    _check_unique(lines, str(path), DataError)
    return lines


def _check_unique(names: list, source: str, error: type) -> None:
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise error(f"{source} repeats the class name(s) {_first(repeated)}: each class needs its own name "
                    "(its metric is iou/<name>)")


def configured_names(config) -> list | None:
    """task.class_names as strings, or None."""
    names = config.task.class_names
    if names is None:
        return None
    names = [str(name) for name in names]
    if not names or any(not name.strip() for name in names):
        raise ConfigError(f"task.class_names={config.task.class_names!r}: expected one non-empty name per class, or "
                          "null to read classes.txt or the masks")
    _check_unique(names, "task.class_names", ConfigError)
    return names


def declared_classes(config, root: Path) -> tuple:
    """(names or None, num_classes or None, where they come from) as the user declared them: task.class_names,
    data.root/classes.txt (both: they must agree), model.num_classes. Raises ConfigError naming both for a
    task.class_names that classes.txt contradicts."""
    file = root / CLASSES_FILE
    names, from_file = configured_names(config), read_classes_file(file)
    if names is not None and from_file is not None and names != from_file:
        raise ConfigError(f"task.class_names={names} but {file} names {from_file}: remove one, or make them agree")
    if names is not None:
        return names, len(names), "task.class_names"
    if from_file is not None:
        return from_file, len(from_file), str(file)
    if config.model.num_classes is not None:
        return None, config.model.num_classes, "model.num_classes"
    return None, None, "the masks"


def check_masks(scan: MaskScan, num_classes: int | None, source: str, offset: int, masks_dir: Path) -> int:
    """The number of classes (declared, or the largest class in the masks + 1), after the checks that turn a
    silent mIoU of 0 into an error naming what was seen: a mask value beyond the classes (naming the first mask
    holding it), masks with no labelled pixel, binary masks saved as 0/255 (255 is ignore: the foreground would
    never be trained), masks holding only 0 and 1 when more classes are declared, masks of a single class.
    `offset`: 1 with task.reduce_zero_label (mask 0 unlabelled, mask c = class c - 1), else 0."""
    raw = set(np.flatnonzero(scan.seen).tolist())
    unlabelled = {IGNORE} | ({0} if offset else set())
    labels = sorted(v - offset for v in raw - unlabelled)  # class indices
    where = f"the {scan.masks} masks under {masks_dir}"
    if not labels:
        raise DataError(f"{where} hold only {sorted(raw)}: no pixel has a class ("
                        f"{IGNORE} is ignore{', and 0 unlabelled with task.reduce_zero_label' if offset else ''})")
    if not offset and raw == {0, IGNORE}:
        raise DataError(f"{where} hold only the values 0 and {IGNORE}: {IGNORE} means ignore, so the foreground of "
                        f"these binary masks would never be trained or scored; save the foreground as 1 "
                        f"(e.g. mask // {IGNORE}), or as its class index")
    if num_classes is None:
        num_classes = labels[-1] + 1
    if labels[-1] >= num_classes:
        value = labels[-1] + offset
        raise DataError(f"mask {scan.first[value]} has value {value}: {num_classes} classes ({source}) allow "
                        f"{offset}..{num_classes - 1 + offset} and {IGNORE} (ignore)"
                        f"{' and 0 (unlabelled, task.reduce_zero_label)' if offset else ''}")
    if not offset and raw - {IGNORE} <= {0, 1} and num_classes > 2:
        raise DataError(f"{where} hold only the values {sorted(raw)}, but {num_classes} classes are declared "
                        f"({source}): masks with 1 on every object cannot teach {num_classes} classes; write each "
                        "pixel's class index into the masks, or declare 2 classes")
    if len(labels) == 1:
        raise DataError(f"{where} hold a single class (mask value {labels[0] + offset}, besides ignore): "
                        "there is nothing to segment; check that the masks hold class indices")
    absent = [str(c + offset) for c in range(num_classes) if c not in set(labels)]
    if absent:
        log.warning("%d of %d classes (%s) appear in no mask; mask values never seen: %s", len(absent), num_classes,
                    source, _first(absent))
    return num_classes


def default_names(num_classes: int, offset: int) -> list:
    """class_<mask value>: the name says which value of the user's masks the class is."""
    return [f"class_{c + offset}" for c in range(num_classes)]


def check_label_range(num_classes: int, offset: int) -> None:
    # masks (and predict's masks) are 8-bit with 255 = ignore: class c is stored as c + offset <= 254
    if num_classes + offset > IGNORE:
        raise ConfigError(f"{num_classes} classes do not fit 8-bit masks with {IGNORE} = ignore"
                          f"{' and 0 unlabelled (task.reduce_zero_label)' if offset else ''}: at most "
                          f"{IGNORE - offset} classes")


def mask_offset(config) -> int:
    """The dataset stores class c as c + offset: 1 with task.reduce_zero_label, else 0."""
    return 1 if config.task.reduce_zero_label else 0


def build_model(config):
    """The FPN segmentation model with model.num_classes outputs (or len(task.class_names); eval mode: logits
    (N, classes, H, W)), from the config alone: a run's config.yaml carries both. Raises ConfigError when neither
    is set."""
    names = configured_names(config)
    num_classes = config.model.num_classes if config.model.num_classes is not None else names and len(names)
    if not num_classes:
        raise ConfigError("folder_seg's model needs model.num_classes or task.class_names (a run's config.yaml "
                          "holds both; the training data fills them at build)")
    check_label_range(num_classes, mask_offset(config))
    return segmentation.build_model(config, num_classes)


def check_data(config) -> None:
    """The folder_seg layout `build` reads, checked without torch and without listing or opening an image or a
    mask: images/<split>/ and masks/<split>/ of task.train_split and task.val_split (`split_dirs`), classes.txt when
    present, and the class settings that need no mask (`declared_classes`; when they give the number of classes,
    the 8-bit range and model.num_classes). Raises ConfigError when data.root is unset or for class settings that
    contradict each other, DataError naming the first missing folder or what is wrong with classes.txt (the
    messages `build` gives)."""
    root = data_root(config.data.root, LAYOUT)
    for split in (config.task.train_split, config.task.val_split):
        split_dirs(root, split)
    _, declared, _ = declared_classes(config, root)
    if declared is not None:
        check_label_range(declared, mask_offset(config))
        if config.model.num_classes is not None:  # compared only: check_data leaves the config as it is
            check_num_classes(config, declared)


def build(config):
    """The folder_seg Task: the pairs of images/<split>/ and masks/<split>/, classes from task.class_names,
    classes.txt, model.num_classes or the masks (written into config.task.class_names and config.model.num_classes),
    the FPN segmentation model (eval mode: logits (N, classes, H, W)), mIoU and per-class IoU on task.val_split.
    Raises DataError naming the file or folder for a layout or mask problem (module docstring), ConfigError for
    class settings that contradict each other or the data."""
    task_cfg = config.task
    root = data_root(config.data.root, LAYOUT)
    train_pairs, val_pairs = pair_split(root, task_cfg.train_split), pair_split(root, task_cfg.val_split)
    shift = mask_offset(config)
    names, declared, source = declared_classes(config, root)
    scan = scan_masks(train_pairs + val_pairs)
    num_classes = check_masks(scan, declared, source, shift, root / "masks")
    check_label_range(num_classes, shift)
    check_num_classes(config, num_classes)
    record_inferred(config, "task.class_names", list(names or default_names(num_classes, shift)))
    names = list(task_cfg.class_names)  # in index order, not sorted as _first lists file stems
    log.info("folder_seg: %d classes (from %s): %s", num_classes, source,
             ", ".join(names[:SHOWN]) + (", ..." if len(names) > SHOWN else ""))
    read = read_label_png_reduced if shift else read_label_png
    items = [[(image, (mask, read)) for image, mask in pairs] for pairs in (train_pairs, val_pairs)]
    return build_segmentation(config, *items, num_classes, tuple(task_cfg.class_names), PREDICTOR)


SYNTHETIC_CLASSES = ("background", "red", "green", "blue")  # class k >= 1 is drawn in scenes.COLOURS[k - 1]


def write_folder_seg(root, train=48, val=12, size=(96, 128), seed=0) -> Path:
    """data.root for folder_seg: classes.txt, images/{train,val}/ (JPEGs, some named .JPG, and PNGs) and
    masks/{train,val}/NAME.png, alternately palette (P) and greyscale (L), objects outlined with 255 (ignore)."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / CLASSES_FILE).write_text("\n".join(SYNTHETIC_CLASSES) + "\n", encoding="utf-8")
    palette = voc_palette()
    for split, count in (("train", train), ("val", val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "masks" / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image, label, _ = scene(rng, *size, len(SYNTHETIC_CLASSES) - 1)
            mask = (label + 1).astype(np.uint8)  # -1 background -> 0, shape k -> k + 1
            mask[outlines(label)] = IGNORE
            name = f"{split}_{i:04d}"
            suffix = (".jpg", ".JPG", ".png")[i % 3]
            Image.fromarray(image).save(root / "images" / split / f"{name}{suffix}",
                                        **({"quality": 95} if suffix != ".png" else {}))
            png = Image.fromarray(mask)  # mode L
            if i % 2:
                png.putpalette(palette)  # mode P: the index is the value, the palette only colours it
            png.save(root / "masks" / split / f"{name}.png")
    return root


def write_synthetic(root, train: int, val: int):
    return write_folder_seg(root, train=train, val=val)


# predict: palette PNGs of the user's mask values (the model's class + 1 with task.reduce_zero_label), overlays with
# every class painted and named (task.class_names, which the run's config.yaml carries)
PREDICTOR = segmentation.predictor(lambda config: (configured_names(config), "task.class_names of the run"),
                                   offset=mask_offset, labelled=True)

TASK = TransferTaskDeclaration(
    name="folder_seg", config=FolderSegConfig, build=build, protocol=PROTOCOL, write_synthetic=write_synthetic,
    build_model=build_model, predictor=PREDICTOR, check_data=check_data,
)
