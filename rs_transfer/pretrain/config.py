"""The `pretrain` config schema: the foundation's RunConfig plus data, augmentation and co-training keys.

Model, optimiser, schedule, label smoothing and EMA keys are the shared `model.*` and `train.*` sections.
"""

from dataclasses import dataclass, field
from typing import Optional

from rs_transfer.config import (
    MAX_PIXELS, DataConfig, RunConfig, above, at_least, at_most, checked, fraction, one_of, only_with,
)


@dataclass
class PretrainDataConfig(DataConfig):
    RELATIONS = (only_with("backend", "torch", "fast_decode"),)

    image_size: int = checked(224, at_least(1), at_most(MAX_PIXELS))  # training resolution S
    eval_image_size: Optional[int] = checked(None, at_least(1), at_most(MAX_PIXELS))  # None: the training resolution, as in the paper
    crop_min_area: float = checked(0.08, fraction(closed_high=True, open_low=True))  # random resized crop area [min, 1]
    # "val": ROOT/val; "minival": hold out minival_fraction of ROOT/train and train on the rest
    eval_split: str = checked("val", one_of("val", "minival"))
    minival_fraction: float = checked(0.02, fraction(open_low=True))
    minival_seed: int = 0  # fixed apart from `seed`, so every run holds out the same images
    # "torch": DataLoader workers with PIL (the reference); "dali": NVIDIA DALI decode and augmentation, on the GPU
    # when training on one (pretrain/dali.py, `pip install -e ".[dali]"`; supervised, TF RandAugment only)
    backend: str = checked("torch", one_of("torch", "dali"))
    # data.backend=torch: draw the random crop from the JPEG header, then decode at 1/2, 1/4 or 1/8 scale where the
    # crop keeps >= image_size px (PIL draft; transforms.ReducedDecodeCrop): the same crop boxes, slightly
    # different pixels, 1.13x images per worker-second at 160 px (docs/benchmarks.md); off: the reference decode
    fast_decode: bool = False


@dataclass
class AugmentConfig:
    RELATIONS = (only_with("randaugment", "timm", "timm_config"),)

    # "tf" (official TF behaviour), "timm" (timm's rand_augment_transform) or "none"
    randaugment: str = checked("tf", one_of("tf", "timm", "none"))
    num_layers: int = checked(2, at_least(0))
    magnitude: float = checked(10.0, at_least(0))  # 0-10 scale; TF's ops go past 10 (the paper uses 15 for large models)
    timm_config: str = ""  # with randaugment=timm: a timm config string, e.g. "rand-m9-mstd0.5-inc1"


@dataclass
class CotrainConfig:
    RELATIONS = (only_with("enabled", True, "pseudo_labels", "data_ratio", "targets"),)

    enabled: bool = False
    pseudo_labels: Optional[str] = None  # the --out folder of `rs-transfer pseudo-label`
    data_ratio: float = checked(1.0, above(0))  # Model Garden semantics: int(B * r / (1 + r)) of each batch of B are pseudo-labelled
    targets: str = checked("soft", one_of("soft", "hard"))  # "soft": the teacher's stored top-k probabilities; "hard": its label (+ label smoothing)


@dataclass
class PretrainConfig(RunConfig):
    data: PretrainDataConfig = field(default_factory=PretrainDataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    cotrain: CotrainConfig = field(default_factory=CotrainConfig)


def check_cotrain(config: PretrainConfig) -> None:
    """UserError for co-training without its pseudo-labels: a config mistake, said before the data are looked at
    (pretrain.run.check_start) and again by build_task for its other callers."""
    from rs_transfer.errors import UserError

    if config.cotrain.enabled and not config.cotrain.pseudo_labels:
        raise UserError("cotrain.enabled needs cotrain.pseudo_labels=OUT, the --out folder of "
                        "`rs-transfer pseudo-label`")
