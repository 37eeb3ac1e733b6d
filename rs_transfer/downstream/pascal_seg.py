"""The pascal_seg task: Pascal VOC 2012 semantic segmentation (21 classes; `task.train_split=trainaug` adds SBD),
mIoU. Readers, model and evaluator are shared with ade_seg in rs_transfer/downstream/segmentation.py.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from rs_transfer.data.text import read_lines
from rs_transfer.downstream.config import DenseSection, FinetuneConfig
from rs_transfer.downstream.protocol import Protocol
from rs_transfer.downstream.registry import TransferTask
from rs_transfer.downstream.scenes import scene, voc_palette
from rs_transfer.downstream import segmentation
from rs_transfer.downstream.segmentation import METRIC, VOC_CLASSES, build_segmentation, voc_items

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


def _boundary(label: np.ndarray) -> np.ndarray:
    # VOC marks object outlines 255 (ignore); mark pixels whose 4-neighbour differs.
    edge = np.zeros(label.shape, dtype=bool)
    edge[1:] |= label[1:] != label[:-1]
    edge[:-1] |= label[1:] != label[:-1]
    edge[:, 1:] |= label[:, 1:] != label[:, :-1]
    edge[:, :-1] |= label[:, 1:] != label[:, :-1]
    return edge


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
        classes[_boundary(label)] = 255
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

TASK = TransferTask(
    name="pascal_seg", config=PascalSegConfig, build=build, protocol=PROTOCOL, write_synthetic=write_synthetic,
    build_model=build_model, predictor=PREDICTOR,
    # Table 5, percent: (backbone, method, pretraining epochs) -> value
    paper={("R152", "supervised", 90): 70.0, ("R152", "SimCLR", 800): 72.2, ("R152", "SimCLRv2", 800): 73.1,
           ("R152", "RS", 400): 78.2, ("R152 2x", "supervised", 90): 72.2, ("R152 2x", "SimCLR", 800): 78.8,
           ("R152 2x", "SimCLRv2", 800): 75.5, ("R152 2x", "RS", 400): 79.2},
)
