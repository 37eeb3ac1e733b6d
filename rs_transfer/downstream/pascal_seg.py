"""The pascal_seg task: Pascal VOC 2012 semantic segmentation (21 classes; `task.train_split=trainaug` adds SBD),
mIoU. The VOC and SBD readers live here; the dataset, model and evaluator are shared with ade_seg in
rs_transfer/downstream/segmentation.py.

Layout (data.root is the folder as distributed): VOC2012/ or VOCdevkit/VOC2012/ (or data.root is VOC2012/):
JPEGImages/<id>.jpg, SegmentationClass/<id>.png (palette PNG, index = class, 255 = ignore/boundary),
ImageSets/Segmentation/{train,val}.txt. trainaug: task.sbd_root holds SBD's dataset/cls/<id>.mat
(GTcls.Segmentation), dataset/img/<id>.jpg, dataset/{train,val}.txt; trainaug = SBD train + SBD val + VOC train -
VOC val (10,582 images).
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from rs_transfer.data.text import read_lines
from rs_transfer.downstream.config import DenseSection, FinetuneConfig
from rs_transfer.downstream.data import find_dir, read_label_png, read_split, require
from rs_transfer.downstream.protocol import Protocol
from rs_transfer.downstream.registry import TransferTaskDeclaration
from rs_transfer.downstream.scenes import outlines, scene, voc_palette
from rs_transfer.downstream import segmentation
from rs_transfer.downstream.segmentation import METRIC, build_segmentation
from rs_transfer.errors import DataError

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)

PROTOCOL = Protocol(METRIC, (5000, 10000, 20000), 64, 512, "VOC seg mIoU")


@dataclass
class PascalSegSection(DenseSection):
    name: str = "pascal_seg"
    train_split: str = "train"  # ImageSets/Segmentation/<split>.txt, or "trainaug" (needs sbd_root)
    val_split: str = "val"
    sbd_root: Optional[str] = None  # folder holding SBD's dataset/cls/*.mat (benchmark_RELEASE)


@dataclass
class PascalSegConfig(FinetuneConfig):
    task: PascalSegSection = field(default_factory=PascalSegSection)


def voc_dir(root):
    return find_dir(root, ("VOC2012", "VOCdevkit/VOC2012", "."), "Pascal VOC 2012 (a VOC2012 folder)")


def read_sbd_mat(path) -> np.ndarray:
    """Class indices (uint8 HxW) of an SBD cls/<id>.mat: the 1x1 struct GTcls, field Segmentation.

    Read without squeezing: squeeze_me would turn a label one pixel wide or high into a vector. Raises
    DataError naming `path` when the struct or field is missing or the label is not 2-D class indices."""
    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError

    try:
        gt = loadmat(require(path, "an SBD label .mat"), struct_as_record=False)["GTcls"]
        label = np.asarray(gt[0, 0].Segmentation)
    except (MatReadError, KeyError, AttributeError, IndexError, TypeError, ValueError) as error:
        raise DataError(f"SBD label {path} has no GTcls.Segmentation: {type(error).__name__}: {error}") from None
    numeric = label.ndim == 2 and label.dtype.kind in "uif"
    if not numeric or not np.all((label % 1 == 0) & (label >= 0) & (label <= 255)):
        raise DataError(f"SBD label {path}: GTcls.Segmentation is {label.dtype} {label.shape}: expected a 2-D "
                           "array of class indices 0..255")
    return label.astype(np.uint8)


VOC_LIST = "one image id per line (VOC2012 ImageSets/Segmentation)"


def split_lists(root, split: str, sbd_root=None) -> tuple:
    """(the VOC2012 folder, [(id list, what it holds)]) of a split, the lists in the order `voc_items` reads them:
    ImageSets/Segmentation/<split>.txt, or for "trainaug" SBD's train.txt and val.txt then VOC's train.txt and
    val.txt. Checks the folders only (data.root unset: ConfigError; a missing JPEGImages/, SegmentationClass/ or
    SBD folder, or trainaug without task.sbd_root: DataError naming it); the lists are not opened."""
    voc = voc_dir(root)
    require(voc / "JPEGImages", "VOC2012/JPEGImages/<id>.jpg")
    require(voc / "SegmentationClass", "VOC2012/SegmentationClass/<id>.png (palette PNGs)")
    sets = voc / "ImageSets" / "Segmentation"
    if split != "trainaug":
        return voc, [(sets / f"{split}.txt", VOC_LIST)]
    if sbd_root is None:
        raise DataError("task.train_split=trainaug needs task.sbd_root=DIR (SBD's benchmark_RELEASE folder)")
    sbd = find_dir(sbd_root, ("dataset", "benchmark_RELEASE/dataset"), "SBD (a dataset folder with cls/ and train.txt)")
    return voc, [(sbd / "train.txt", "SBD train ids"), (sbd / "val.txt", "SBD val ids"),
                 (sets / "train.txt", VOC_LIST), (sets / "val.txt", VOC_LIST)]


def voc_items(root, split: str, sbd_root=None) -> list:
    """[(image path, (label path, loader))] for a VOC split; "trainaug" merges SBD."""
    voc, lists = split_lists(root, split, sbd_root)
    ids = [read_split(path, expected) for path, expected in lists]
    jpeg = voc / "JPEGImages"
    if split != "trainaug":
        return [(jpeg / f"{i}.jpg", (voc / "SegmentationClass" / f"{i}.png", read_label_png)) for i in ids[0]]
    sbd = lists[0][0].parent
    sbd_ids, voc_train, val = ids[0] + ids[1], ids[2], set(ids[3])
    items, seen = [], set()
    for i in voc_train + sbd_ids:
        if i in val or i in seen:
            continue
        seen.add(i)
        png = voc / "SegmentationClass" / f"{i}.png"
        label = (png, read_label_png) if png.exists() else (sbd / "cls" / f"{i}.mat", read_sbd_mat)
        image = jpeg / f"{i}.jpg"
        items.append((image if image.exists() else sbd / "img" / f"{i}.jpg", label))
    return items


def check_data(config) -> None:
    """The VOC (+ SBD) layout `build` reads, checked without torch and without opening an image or a list: the
    folders and the id lists of task.train_split and task.val_split exist (`split_lists`). Raises ConfigError when
    data.root is unset, DataError naming the first missing folder or list (the messages `build` gives)."""
    task_cfg = config.task
    for split, sbd_root in ((task_cfg.train_split, task_cfg.sbd_root), (task_cfg.val_split, None)):
        for path, expected in split_lists(config.data.root, split, sbd_root)[1]:
            require(path, expected)


def build_model(config):
    """The FPN segmentation model with 21 outputs (eval mode: logits (N, 21, H, W)), from the config alone."""
    return segmentation.build_model(config, len(VOC_CLASSES))


def build(config):
    """The pascal_seg Task: VOC 2012 (+ SBD with task.train_split=trainaug) image/label pairs, the FPN segmentation
    model with 21 outputs (eval mode: logits (N, 21, H, W)), mIoU on task.val_split (segmentation.build_segmentation).
    Raises DataError for a missing or malformed layout (naming the file), ConfigError for model.num_classes != 21."""
    task_cfg, root = config.task, config.data.root
    return build_segmentation(config, voc_items(root, task_cfg.train_split, task_cfg.sbd_root),
                              voc_items(root, task_cfg.val_split), len(VOC_CLASSES), VOC_CLASSES, PREDICTOR)


SYNTHETIC_CLASSES = (1, 8, 15)  # the VOC classes synthetic scenes draw: aeroplane, cat, person


def write_voc_seg(root, train=48, val=12, size=(96, 128), seed=0) -> Path:
    """VOCdevkit/VOC2012 with JPEGImages, palette PNGs in SegmentationClass (255 outlines) and ImageSets."""
    rng = np.random.default_rng(seed)
    voc = Path(root) / "VOCdevkit" / "VOC2012"
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / folder).mkdir(parents=True, exist_ok=True)
    palette = voc_palette()
    ids = [f"2007_{i:06d}" for i in range(train + val)]
    for image_id in ids:
        image, label, _ = scene(rng, *size, len(SYNTHETIC_CLASSES))
        classes = np.where(label >= 0, np.take(SYNTHETIC_CLASSES, np.clip(label, 0, None)), 0).astype(np.uint8)
        classes[outlines(label)] = 255  # VOC marks object outlines 255 (ignore)
        Image.fromarray(image).save(voc / "JPEGImages" / f"{image_id}.jpg", quality=95)
        png = Image.fromarray(classes)  # mode L; putpalette turns it into P
        png.putpalette(palette)
        png.save(voc / "SegmentationClass" / f"{image_id}.png")
    sets = voc / "ImageSets" / "Segmentation"
    (sets / "train.txt").write_text("\n".join(ids[:train]) + "\n")
    (sets / "val.txt").write_text("\n".join(ids[train:]) + "\n")
    (sets / "trainval.txt").write_text("\n".join(ids) + "\n")
    return Path(root)


def write_sbd(root, voc_root, extra=4, size=(96, 128), seed=1) -> Path:
    """SBD's benchmark_RELEASE/dataset: img/<id>.jpg, cls/<id>.mat (GTcls.Segmentation), train.txt, val.txt.

    Holds `extra` new images plus the first VOC val image (which trainaug must drop)."""
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    sbd = Path(root) / "benchmark_RELEASE" / "dataset"
    (sbd / "img").mkdir(parents=True, exist_ok=True)
    (sbd / "cls").mkdir(parents=True, exist_ok=True)
    voc_val = read_lines(Path(voc_root) / "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt")
    ids = [f"2008_{i:06d}" for i in range(extra)]
    for image_id in ids:
        image, label, _ = scene(rng, *size, len(SYNTHETIC_CLASSES))
        classes = np.where(label >= 0, np.take(SYNTHETIC_CLASSES, np.clip(label, 0, None)), 0).astype(np.uint8)
        Image.fromarray(image).save(sbd / "img" / f"{image_id}.jpg", quality=95)
        savemat(sbd / "cls" / f"{image_id}.mat", {"GTcls": {"Segmentation": classes, "CategoriesPresent": np.unique(classes)}})
    (sbd / "train.txt").write_text("\n".join(ids[: extra // 2]) + "\n")
    (sbd / "val.txt").write_text("\n".join(ids[extra // 2:] + voc_val[:1]) + "\n")
    return Path(root) / "benchmark_RELEASE"


def write_synthetic(root, train: int, val: int):
    return write_voc_seg(root, train=train, val=val)


# predict: VOC palette PNGs of VOC indices (0 = background, not painted on the overlays); segmentation.predictor
PREDICTOR = segmentation.predictor(VOC_CLASSES, offset=0, background=0, source="the 21 VOC classes")

TASK = TransferTaskDeclaration(
    name="pascal_seg", config=PascalSegConfig, build=build, protocol=PROTOCOL, write_synthetic=write_synthetic,
    build_model=build_model, predictor=PREDICTOR, check_data=check_data,
    # Table 5, percent: (backbone, method, pretraining epochs) -> value
    paper={("R152", "supervised", 90): 70.0, ("R152", "SimCLR", 800): 72.2, ("R152", "SimCLRv2", 800): 73.1,
           ("R152", "RS", 400): 78.2, ("R152 2x", "supervised", 90): 72.2, ("R152 2x", "SimCLR", 800): 78.8,
           ("R152 2x", "SimCLRv2", 800): 75.5, ("R152 2x", "RS", 400): 79.2},
)
