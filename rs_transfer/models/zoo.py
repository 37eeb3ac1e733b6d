"""The zoo as data, importable without torch: the model-name grammar, the block layouts, the paper's Table 7 and
the timm weights that exist for each released model. Checked by tests.

Name parsing lives here, not in resnet_rs.py (which imports torch and timm, ~3 s), so that `rs-transfer info` with
a bad name, and every `--help`, answer at once.

Names users type (the grammar, case-insensitive):
    rs<depth>[-w<mult>]                    ResNet-RS: SE in every block + ResNet-D (deep stem, stem pool -> conv,
                                           average-pool shortcut)
    resnet<depth>[-w<mult>][-se][-d]       vanilla bottleneck ResNet, optionally with SE and/or ResNet-D
e.g. rs50, rs152, rs101-w1.5, rs26-w0.25, resnet152, resnet152-w2, resnet200-se, resnet200-d.
`rs200` is the same network as `resnet200-se-d`.

Table 7's numbers are the paper's (PAPER.md section 2); `tests/test_models.py` proves our built models match the
params and GFLOPs columns, so the CLI can print them without building anything.
"""

import dataclasses
import re
from dataclasses import dataclass

from rs_transfer.errors import UserError

# Blocks per stage (c2, c3, c4, c5). 26 is not in the paper's table: (2, 2, 2, 2) is timm's resnet26 layout,
# the one bottleneck layout with 26 layers (2 + 3 * 8).
LAYOUTS = {
    26: (2, 2, 2, 2),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
    200: (3, 24, 36, 3),
    270: (4, 29, 53, 4),
    300: (4, 36, 54, 4),
    350: (4, 36, 72, 4),
    400: (6, 48, 72, 6),
    420: (4, 44, 87, 4),
}
SCALING_DEPTHS = (26, 50, 101, 200, 300, 350, 400)
SCALING_WIDTHS = (0.25, 0.5, 1.0, 1.5, 2.0)
SCALING_RESOLUTIONS = (128, 160, 224, 320, 448)
RELEASED = ("rs50", "rs101", "rs152", "rs200", "rs270", "rs350", "rs420")

STAGE_WIDTHS = (64, 128, 256, 512)
FEATURE_STRIDES = (4, 8, 16, 32)

_NAME = re.compile(r"^(rs|resnet)(\d+)((?:-(?:w[0-9.]+|se|d))*)$")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    depth: int
    width: float = 1.0
    se: bool = True
    resnet_d: bool = True

    @property
    def layout(self) -> tuple:
        return LAYOUTS[self.depth]


def parse_name(name: str) -> ModelSpec:
    """Turn a user-typed model name into a `ModelSpec`, or raise a `UserError` that shows the grammar."""
    match = _NAME.match(name.strip().lower())
    if match is None:
        raise UserError(
            f"unknown model name {name!r}: expected rs<depth>[-w<mult>] or resnet<depth>[-w<mult>][-se][-d], "
            f"e.g. rs50, rs101-w1.5, resnet152-w2, resnet200-se; depths: {sorted(LAYOUTS)}"
        )
    family, depth, suffix = match.group(1), int(match.group(2)), match.group(3)
    if depth not in LAYOUTS:
        raise UserError(f"unknown depth {depth} in model name {name!r}; depths: {sorted(LAYOUTS)}")
    parts = [p for p in suffix.split("-") if p]
    if len(set(parts)) != len(parts):
        raise UserError(f"model name {name!r} repeats a suffix")
    width = 1.0
    for part in parts:
        if part.startswith("w"):
            try:
                width = float(part[1:])
            except ValueError:
                raise UserError(f"bad width multiplier {part!r} in model name {name!r}") from None
            if width <= 0:
                raise UserError(f"width multiplier must be positive in model name {name!r}")
    if family == "rs":
        if "se" in parts or "d" in parts:
            raise UserError(f"model name {name!r}: rs models already have SE and ResNet-D")
        return ModelSpec(name=name, depth=depth, width=width, se=True, resnet_d=True)
    return ModelSpec(name=name, depth=depth, width=width, se="se" in parts, resnet_d="d" in parts)


INITS = ("official", "timm")
DROP_PATH_SCHEDULES = ("stage", "block")


@dataclass(frozen=True)
class ArchArgs:
    """The architecture switches every zoo network takes, 2D (resnet_rs.build_resnet) and 3D (resnet3d_rs.ResNet3d)
    alike, with the official behaviour as the default (PAPER.md sections 2 and 7; timm's differences are switches).

    drop_rate: dropout before the classifier. drop_path_rate: stochastic depth, spread over the blocks by
    drop_path_schedule ("stage": constant within a stage, the official TF code; "block": linear, timm's).
    zero_init_last: gamma 0 in each block's last BN (TF1 release). bn_momentum, bn_eps: PyTorch's convention (the RS
    recipe's 1.0 goes with an EMA of the BN buffers). init: "official" (truncated-normal fan-in convs, classifier
    std 0.01) or "timm" (kaiming fan-out). Raises UserError for an unknown init or schedule."""

    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    drop_path_schedule: str = "stage"
    zero_init_last: bool = True
    bn_momentum: float = 0.1
    bn_eps: float = 1e-5
    init: str = "official"

    def __post_init__(self):
        if self.init not in INITS:
            raise UserError(f"unknown init {self.init!r}: expected 'official' or 'timm'")
        if self.drop_path_schedule not in DROP_PATH_SCHEDULES:
            raise UserError(f"unknown stochastic depth schedule {self.drop_path_schedule!r}: expected 'stage' or "
                            "'block'")

    @classmethod
    def of(cls, switches: dict) -> "ArchArgs":
        """From keyword arguments; UserError naming an unknown one (a builder's **arch)."""
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(switches) - known)
        if unknown:
            raise UserError(f"unknown model argument {unknown[0]!r}: expected some of {', '.join(sorted(known))}")
        return cls(**switches)

    @classmethod
    def from_config(cls, model_config) -> "ArchArgs":
        """From a run config's `model` section (config.ModelConfig: the same names; bn_eps is not a config key)."""
        names = [field.name for field in dataclasses.fields(cls) if hasattr(model_config, field.name)]
        return cls(**{name: getattr(model_config, name) for name in names})

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def scaling_grid_names() -> list:
    return [f"rs{d}-w{w:g}" for d in SCALING_DEPTHS for w in SCALING_WIDTHS]


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
    Table7Row("efficientnet_b0", 224, 5.3, 0.8, 0.47, 90, 77.1),
    Table7Row("efficientnet_b1", 240, 7.8, 1.4, 0.82, 150, 79.1),
    Table7Row("efficientnet_b2", 260, 9.2, 2.0, 1.03, 210, 80.1),
    Table7Row("efficientnet_b3", 300, 12, 3.6, 1.76, 340, 81.6),
    Table7Row("efficientnet_b4", 380, 19, 8.4, 4.0, 710, 82.9),
    Table7Row("efficientnet_b5", 456, 30, 20, 8.16, 1510, 83.7),
    Table7Row("efficientnet_b6", 528, 43, 38, 15.7, 3010, 84.0),
    Table7Row("efficientnet_b7", 600, 66, 74, 29.9, 6020, 84.7),
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
