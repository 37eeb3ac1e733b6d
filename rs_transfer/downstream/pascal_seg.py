"""The pascal_seg task: Pascal VOC 2012 semantic segmentation (21 classes; `task.train_split=trainaug` adds SBD),
mIoU. Readers, model and evaluator are shared with ade_seg in rs_transfer/downstream/segmentation.py.
"""

from dataclasses import dataclass, field
from typing import Optional

from rs_transfer.downstream import synthetic
from rs_transfer.downstream.config import DenseSection, FinetuneConfig
from rs_transfer.downstream.protocol import Protocol
from rs_transfer.downstream.registry import TransferTask
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


def build(config):
    t, root = config.task, config.data.root
    return build_segmentation(config, voc_items(root, t.train_split, t.sbd_root), voc_items(root, t.val_split),
                              len(VOC_CLASSES), VOC_CLASSES)


def write_synthetic(root, train: int, val: int):
    return synthetic.write_voc_seg(root, train=train, val=val)


TASK = TransferTask(
    name="pascal_seg", config=PascalSegConfig, build=build, protocol=PROTOCOL, write_synthetic=write_synthetic,
    # Table 5, percent: (backbone, method, pretraining epochs) -> value
    paper={("R152", "supervised", 90): 70.0, ("R152", "SimCLR", 800): 72.2, ("R152", "SimCLRv2", 800): 73.1,
           ("R152", "RS", 400): 78.2, ("R152 2x", "supervised", 90): 72.2, ("R152 2x", "SimCLR", 800): 78.8,
           ("R152 2x", "SimCLRv2", 800): 75.5, ("R152 2x", "RS", 400): 79.2},
)
