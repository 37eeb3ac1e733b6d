"""The `pretrain` config schema: the foundation's RunConfig plus data, augmentation and co-training keys.

Model, optimiser, schedule, label smoothing and EMA keys are the shared `model.*` and `train.*` sections.
"""

from dataclasses import dataclass, field
from typing import Optional

from rs_transfer.config import DataConfig, RunConfig


@dataclass
class PretrainDataConfig(DataConfig):
    image_size: int = 224  # training resolution S
    eval_image_size: Optional[int] = None  # None: the training resolution, as in the paper
    crop_min_area: float = 0.08  # random resized crop area range [crop_min_area, 1]
    eval_split: str = "val"  # "val": ROOT/val; "minival": hold out minival_fraction of ROOT/train and train on the rest
    minival_fraction: float = 0.02
    minival_seed: int = 0  # fixed apart from `seed`, so every run holds out the same images


@dataclass
class AugmentConfig:
    randaugment: str = "tf"  # "tf" (official TF behaviour), "timm" (timm's rand_augment_transform) or "none"
    num_layers: int = 2
    magnitude: float = 10.0  # 0-10 scale; TF's ops go past 10 (the paper uses 15 for large models)
    timm_config: str = ""  # with randaugment=timm: a timm config string, e.g. "rand-m9-mstd0.5-inc1"


@dataclass
class CotrainConfig:
    enabled: bool = False
    pseudo_labels: Optional[str] = None  # the --out folder of `rs-transfer pseudo-label`
    data_ratio: float = 1.0  # Model Garden semantics: int(B * r / (1 + r)) of each batch of B are pseudo-labelled
    targets: str = "soft"  # "soft": the teacher's stored top-k probabilities; "hard": its label (+ label smoothing)


@dataclass
class PretrainConfig(RunConfig):
    data: PretrainDataConfig = field(default_factory=PretrainDataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    cotrain: CotrainConfig = field(default_factory=CotrainConfig)
