"""The paper's fine-tuning protocol (Appendix F, PAPER.md section 5) and its Table 5, in one place.

`rs-transfer sweep` runs `grid(task)`; `rs-transfer reproduce table5` prints `TABLE5` as the reference column.
tests/test_downstream_protocol.py checks these numbers against PAPER.md.
"""

from dataclasses import dataclass

LEARNING_RATES = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32)
WEIGHT_DECAY = 1e-4
SCHEDULE = "cosine"


@dataclass(frozen=True)
class Protocol:
    metric: str  # the key in final_metrics.json, a fraction
    steps: tuple  # the training lengths of the grid
    batch_size: int
    crop_size: int | None  # training crop; cifar100 resizes whole images instead
    column: str  # the Table 5 column


# Steps: the paper gives the range (5k-20k, depth 10k-40k); the grid doubles through it. Batch 64 for ADE20K is
# not stated: it uses the VOC segmentation model and batch. The NYU depth crop is 640 (scale jitter [0.5, 2.0]).
PROTOCOLS = {
    "cifar100": Protocol("top1", (5000, 10000, 20000), 512, None, "CIFAR-100 acc"),
    "pascal_det": Protocol("ap50", (5000, 10000, 20000), 32, 896, "VOC det AP50"),
    "pascal_seg": Protocol("miou", (5000, 10000, 20000), 64, 512, "VOC seg mIoU"),
    "ade_seg": Protocol("miou", (5000, 10000, 20000), 64, 512, "ADE seg mIoU"),
    "nyu_depth": Protocol("delta1", (10000, 20000, 40000), 64, 640, "NYU depth <1.25 %"),
}
TASKS = tuple(PROTOCOLS)
SCALE_RANGE = (0.5, 2.0)

# Table 5 (percent): (backbone, method, pretraining epochs) -> task -> value.
TABLE5_TASKS = ("cifar100", "pascal_det", "pascal_seg", "ade_seg", "nyu_depth")
TABLE5 = {
    ("R152", "supervised", 90): (85.5, 80.0, 70.0, 40.2, 81.2),
    ("R152", "SimCLR", 800): (87.1, 83.3, 72.2, 41.0, 83.5),
    ("R152", "SimCLRv2", 800): (84.7, 79.1, 73.1, 41.1, 84.7),
    ("R152", "RS", 400): (88.1, 82.2, 78.2, 42.2, 83.4),
    ("R152 2x", "supervised", 90): (86.6, 81.1, 72.2, 41.4, 82.5),
    ("R152 2x", "SimCLR", 800): (89.0, 85.3, 78.8, 45.2, 86.8),
    ("R152 2x", "SimCLRv2", 800): (84.8, 80.1, 75.5, 42.5, 86.1),
    ("R152 2x", "RS", 400): (89.3, 84.1, 79.2, 44.1, 84.7),
}


def paper_value(backbone: str, method: str, task: str) -> float:
    for (b, m, _), values in TABLE5.items():
        if b == backbone and m == method:
            return values[TABLE5_TASKS.index(task)]
    raise KeyError((backbone, method))


def grid(task: str, learning_rates=None, steps=None) -> list:
    """Every (lr, steps) point of the task's grid (or of the given values), in the one order used everywhere:
    shortest training first, and within one length the learning rates from low to high. `sweep` runs them in
    this order and `sweep --point I` runs `grid(task)[I]`."""
    return [(lr, s) for s in (steps or PROTOCOLS[task].steps) for lr in (learning_rates or LEARNING_RATES)]


def point_name(lr: float, steps: int) -> str:
    return f"lr{lr:g}_steps{steps}"
