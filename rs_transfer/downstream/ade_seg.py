"""The ade_seg task: ADE20K semantic segmentation (150 classes; label 0 "other" is ignored), mIoU. Readers, model
and evaluator are shared with pascal_seg in rs_transfer/downstream/segmentation.py.
"""

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from rs_transfer.downstream.config import DenseSection, FinetuneConfig
from rs_transfer.downstream.protocol import Protocol
from rs_transfer.downstream.registry import TransferTask
from rs_transfer.downstream.scenes import scene
from rs_transfer.downstream import segmentation
from rs_transfer.downstream.segmentation import ADE_CLASSES, ADE_NUM_CLASSES, METRIC, ade_items, build_segmentation

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

TASK = TransferTask(
    name="ade_seg", config=AdeSegConfig, build=build, protocol=PROTOCOL, write_synthetic=write_synthetic,
    build_model=build_model, predictor=PREDICTOR,
    # Table 5, percent: (backbone, method, pretraining epochs) -> value
    paper={("R152", "supervised", 90): 40.2, ("R152", "SimCLR", 800): 41.0, ("R152", "SimCLRv2", 800): 41.1,
           ("R152", "RS", 400): 42.2, ("R152 2x", "supervised", 90): 41.4, ("R152 2x", "SimCLR", 800): 45.2,
           ("R152 2x", "SimCLRv2", 800): 42.5, ("R152 2x", "RS", 400): 44.1},
)
