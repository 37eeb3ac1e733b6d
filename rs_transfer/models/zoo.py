"""The paper's Table 7 and the timm weights that exist for each released model: data, checked by tests.

Numbers are the paper's (PAPER.md section 2); `tests/test_models.py` proves our built models match the params
and GFLOPs columns, so the CLI can print them without building anything.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Table7Row:
    model: str  # zoo name (rs50) or timm name (efficientnet_b0)
    resolution: int  # train = test resolution
    params_m: float
    gflops: float
    v100_s: float  # V100 fp32 training latency, seconds per 128 images
    tpu_ms: float | None  # TPUv3 training latency, ms per 1024 images
    top1: float


TABLE7 = (
    Table7Row("rs50", 160, 36, 4.6, 0.31, 70, 78.8),
    Table7Row("rs101", 160, 64, 8.4, 0.48, 120, 80.3),
    Table7Row("rs101", 192, 64, 12, 0.70, 170, 81.2),
    Table7Row("rs152", 192, 87, 18, 0.99, 240, 82.0),
    Table7Row("rs152", 224, 87, 24, 1.48, 320, 82.8),
    Table7Row("rs152", 256, 87, 31, 1.76, 410, 83.0),
    Table7Row("rs200", 256, 93, 40, 2.86, 570, 83.4),
    Table7Row("rs270", 256, 130, 54, 3.76, 780, 83.8),
    Table7Row("rs350", 256, 164, 69, 4.72, 1100, 84.0),
    Table7Row("rs350", 320, 164, 107, 8.48, 1630, 84.2),
    Table7Row("rs420", 320, 192, 128, 10.16, 2090, 84.4),
    Table7Row("efficientnet_b0", 224, 5.3, 0.8, 0.47, None, 77.1),
    Table7Row("efficientnet_b1", 240, 7.8, 1.4, 0.82, None, 79.1),
    Table7Row("efficientnet_b2", 260, 9.2, 2.0, 1.03, None, 80.1),
    Table7Row("efficientnet_b3", 300, 12, 3.6, 1.76, None, 81.6),
    Table7Row("efficientnet_b4", 380, 19, 8.4, 4.0, None, 82.9),
    Table7Row("efficientnet_b5", 456, 30, 20, 8.16, None, 83.7),
    Table7Row("efficientnet_b6", 528, 43, 38, 15.7, None, 84.0),
    Table7Row("efficientnet_b7", 600, 66, 74, 29.9, None, 84.7),
)

# Exact parameter counts of timm's ports (PAPER.md section 7), in millions, 1000 classes.
TIMM_PARAMS_M = {
    "rs50": 35.69, "rs101": 63.62, "rs152": 86.62, "rs200": 93.21, "rs270": 129.86, "rs350": 163.96, "rs420": 191.89,
}

# timm weight tags. The files are not downloaded here: a user fetches one and passes its path as `weights`.
TIMM_TAGS = {
    "rs50": "resnetrs50.tf_in1k", "rs101": "resnetrs101.tf_in1k", "rs152": "resnetrs152.tf_in1k",
    "rs200": "resnetrs200.tf_in1k", "rs270": "resnetrs270.tf_in1k", "rs350": "resnetrs350.tf_in1k",
    "rs420": "resnetrs420.tf_in1k", "resnet152": "resnet152.tv_in1k",
}


def table7_rows(model: str) -> list:
    return [row for row in TABLE7 if row.model == model]
