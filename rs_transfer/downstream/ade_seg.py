"""The ade_seg task: ADE20K semantic segmentation (150 classes; label 0 "other" is ignored), mIoU. The ADE reader
lives here; the dataset, model and evaluator are shared with pascal_seg in rs_transfer/downstream/segmentation.py.

Layout (data.root is the folder as distributed): ADEChallengeData2016/ (or data.root is it):
images/{training,validation}/*.jpg, annotations/{training,validation}/<same stem>.png (greyscale, 0 = other,
ignored; 1..150 = classes, shifted to 0..149).
"""

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from rs_transfer.downstream.config import DenseSection, FinetuneConfig
from rs_transfer.downstream.data import find_dir, read_label_png_reduced, require
from rs_transfer.downstream.protocol import Protocol
from rs_transfer.downstream.registry import TransferTaskDeclaration
from rs_transfer.downstream.scenes import scene
from rs_transfer.downstream import segmentation
from rs_transfer.downstream.segmentation import METRIC, build_segmentation
from rs_transfer.errors import DataError

ADE_NUM_CLASSES = 150
# ADE20K's SceneParsing class names (objectInfo150), in training index order (raw label - 1), as mmsegmentation.
ADE_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet", "sidewalk",
    "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water", "painting", "sofa",
    "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe",
    "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter",
    "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case",
    "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind", "coffee table",
    "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm", "kitchen island", "computer",
    "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower",
    "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane", "dirt track", "apparel",
    "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship",
    "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel", "basket",
    "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name",
    "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood",
    "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)

# Batch 64 for ADE20K is not stated: it uses the VOC segmentation model and batch.
PROTOCOL = Protocol(METRIC, (5000, 10000, 20000), 64, 512, "ADE seg mIoU")


@dataclass
class AdeSegSection(DenseSection):
    name: str = "ade_seg"
    train_split: str = "train"  # "train" = images/training, "val" = images/validation, or a folder name
    val_split: str = "val"


@dataclass
class AdeSegConfig(FinetuneConfig):
    task: AdeSegSection = field(default_factory=AdeSegSection)


def split_dirs(root, split: str) -> tuple:
    """(images folder, annotations folder) of an ADE split: "train", "val" or a folder name under images/.
    Raises ConfigError when data.root is unset, DataError naming the missing folder; lists no file."""
    ade = find_dir(root, ("ADEChallengeData2016", "."), "ADE20K (an ADEChallengeData2016 folder)")
    folder = {"train": "training", "val": "validation"}.get(split, split)
    images = require(ade / "images" / folder, f"ADEChallengeData2016/images/{folder}/*.jpg")
    annotations = require(ade / "annotations" / folder, f"ADEChallengeData2016/annotations/{folder}/*.png")
    return images, annotations


def ade_items(root, split: str) -> list:
    """[(image path, (label path, loader))] for an ADE split: "train", "val" or a folder name under images/."""
    images, annotations = split_dirs(root, split)
    paths = sorted(images.glob("*.jpg"))
    if not paths:
        raise DataError(f"no .jpg images in {images}")
    return [(p, (annotations / f"{p.stem}.png", read_ade_label)) for p in paths]


# 0 ("other") -> 255 ignore, 1..150 -> 0..149 (ADE has no 255; one would stay ignored, as in mmsegmentation)
read_ade_label = read_label_png_reduced


def check_data(config) -> None:
    """The ADE20K layout `build` reads, checked without torch and without listing the images: the images/ and
    annotations/ folders of task.train_split and task.val_split (`split_dirs`). Raises ConfigError when data.root is
    unset, DataError naming the first missing folder (the messages `build` gives)."""
    for split in (config.task.train_split, config.task.val_split):
        split_dirs(config.data.root, split)


def build_model(config):
    """The FPN segmentation model with 150 outputs (eval mode: logits (N, 150, H, W)), from the config alone."""
    return segmentation.build_model(config, ADE_NUM_CLASSES)


def build(config):
    """The ade_seg Task: ADEChallengeData2016 image/label pairs (label 0 "other" ignored, 1..150 -> 0..149), the
    FPN segmentation model with 150 outputs (eval mode: logits (N, 150, H, W)), mIoU on task.val_split.
    Raises DataError for a missing or malformed layout (naming the file), ConfigError for model.num_classes != 150."""
    task_cfg, root = config.task, config.data.root
    return build_segmentation(config, ade_items(root, task_cfg.train_split), ade_items(root, task_cfg.val_split),
                              ADE_NUM_CLASSES, predictor=PREDICTOR)


# Raw ADE labels synthetic scenes use (0 = other; the first is the background), so the -1 shift and the last class
# are exercised.
SYNTHETIC_CLASSES = (1, 3, 13, 150)


def write_ade(root, train=48, val=12, size=(96, 128), seed=0) -> Path:
    """ADEChallengeData2016/images|annotations/training|validation, greyscale PNG labels (0 = other)."""
    rng = np.random.default_rng(seed)
    ade = Path(root) / "ADEChallengeData2016"
    for split, count, prefix in (("training", train, "ADE_train"), ("validation", val, "ADE_val")):
        (ade / "images" / split).mkdir(parents=True, exist_ok=True)
        (ade / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image, label, _ = scene(rng, *size, len(SYNTHETIC_CLASSES) - 1)
            raw = np.where(label >= 0, np.take(SYNTHETIC_CLASSES[1:], np.clip(label, 0, None)), SYNTHETIC_CLASSES[0])
            # Background is a real class (ADE label 1); a band of "other" (0) pixels exercises the ignore label.
            raw[: size[0] // 10] = 0
            name = f"{prefix}_{i + 1:08d}"
            Image.fromarray(image).save(ade / "images" / split / f"{name}.jpg", quality=95)
            Image.fromarray(raw.astype(np.uint8)).save(ade / "annotations" / split / f"{name}.png")
    return Path(root)


def write_synthetic(root, train: int, val: int):
    return write_ade(root, train=train, val=val)


# predict: PNGs of ADE's raw indices (prediction + 1; 0 "other" is never predicted); segmentation.predictor
PREDICTOR = segmentation.predictor(ADE_CLASSES, offset=1, source="the 150 ADE20K SceneParsing classes")

TASK = TransferTaskDeclaration(
    name="ade_seg", config=AdeSegConfig, build=build, protocol=PROTOCOL, write_synthetic=write_synthetic,
    build_model=build_model, predictor=PREDICTOR, check_data=check_data,
    # Table 5, percent: (backbone, method, pretraining epochs) -> value
    paper={("R152", "supervised", 90): 40.2, ("R152", "SimCLR", 800): 41.0, ("R152", "SimCLRv2", 800): 41.1,
           ("R152", "RS", 400): 42.2, ("R152 2x", "supervised", 90): 41.4, ("R152 2x", "SimCLR", 800): 45.2,
           ("R152 2x", "SimCLRv2", 800): 42.5, ("R152 2x", "RS", 400): 44.1},
)
