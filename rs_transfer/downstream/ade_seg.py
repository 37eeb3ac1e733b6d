"""The ade_seg task: ADE20K semantic segmentation (150 classes; label 0 "other" is ignored), mIoU. Readers, model
and evaluator are shared with pascal_seg in rs_transfer/downstream/segmentation.py.
"""

from dataclasses import dataclass, field

from rs_transfer.downstream import synthetic
from rs_transfer.downstream.config import DenseSection, FinetuneConfig
from rs_transfer.downstream.protocol import Protocol
from rs_transfer.downstream.registry import TransferTask
from rs_transfer.downstream.segmentation import ADE_NUM_CLASSES, METRIC, ade_items, build_segmentation

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


def build(config):
    t, root = config.task, config.data.root
    return build_segmentation(config, ade_items(root, t.train_split), ade_items(root, t.val_split), ADE_NUM_CLASSES)


def write_synthetic(root, train: int, val: int):
    return synthetic.write_ade(root, train=train, val=val)


TASK = TransferTask(
    name="ade_seg", config=AdeSegConfig, build=build, protocol=PROTOCOL, write_synthetic=write_synthetic,
    # Table 5, percent: (backbone, method, pretraining epochs) -> value
    paper={("R152", "supervised", 90): 40.2, ("R152", "SimCLR", 800): 41.0, ("R152", "SimCLRv2", 800): 41.1,
           ("R152", "RS", 400): 42.2, ("R152 2x", "supervised", 90): 41.4, ("R152 2x", "SimCLR", 800): 45.2,
           ("R152 2x", "SimCLRv2", 800): 42.5, ("R152 2x", "RS", 400): 44.1},
)
