"""The fine-tuning config: the shared `RunConfig` (model, data, train, output_dir) plus a `task` section.

One schema serves every task; keys a task does not use are ignored by it (e.g. `det_*` by segmentation), which
keeps `configs/downstream/<task>.yaml` flat and lets a `--config` file switch tasks without a second schema.
"""

from dataclasses import dataclass, field
from typing import Optional

from rs_transfer.config import ConfigError, DataConfig, RunConfig


@dataclass
class TaskConfig:
    name: str = "pascal_seg"  # cifar100, pascal_seg, ade_seg, nyu_depth, pascal_det
    crop_size: int = 512  # training crop (segmentation 512, detection 896, depth 640 in the paper)
    scale_min: float = 0.5  # scale jitter range, relative to the crop
    scale_max: float = 2.0
    image_size: int = 256  # cifar100: images are resized to this (the paper: 256)
    fpn_channels: int = 256
    head_channels: int = 256  # width of the 3 conv layers of the dense head
    eval_batch_size: int = 8
    # pascal_seg
    train_split: str = "train"  # ImageSets/Segmentation/<split>.txt, or "trainaug" (needs sbd_root)
    val_split: str = "val"
    sbd_root: Optional[str] = None  # folder holding SBD's dataset/cls/*.mat (benchmark_RELEASE)
    # nyu_depth
    nyu_format: str = "auto"  # "h5" (sparse-to-dense release), "bts" (sync PNGs + file lists) or "auto"
    depth_min: float = 1e-3  # metres; ground truth outside (depth_min, depth_max) is not evaluated
    depth_max: float = 10.0
    eigen_crop: bool = True  # evaluate inside the Eigen et al. crop (rows 45:471, cols 41:601 of 480x640)
    # pascal_det
    det_train_sets: list = field(default_factory=lambda: ["2007:trainval", "2012:trainval"])
    det_test_set: str = "2007:test"
    anchor_sizes: list = field(default_factory=lambda: [32, 64, 128, 256, 512])  # one per level, P3-P7
    det_eval_size: int = 896  # test images: longer side resized to this
    det_fc_channels: int = 1024  # the box head's FC ("4conv1fc"); its convs are fpn_channels wide
    det_rois_per_image: int = 512  # RoIs sampled per training image for the box head (torchvision's default)
    det_score_thresh: float = 0.001
    det_max_per_image: int = 100


@dataclass
class FinetuneData(DataConfig):
    synthetic_images: int = 48  # --synthetic: training images written (validation gets a quarter)


@dataclass
class FinetuneConfig(RunConfig):
    data: FinetuneData = field(default_factory=FinetuneData)
    task: TaskConfig = field(default_factory=TaskConfig)


def arch_args(config) -> dict:
    """The backbone's architecture switches from `model.*`, for `create_model`."""
    m = config.model
    return dict(drop_path_rate=m.drop_path_rate, drop_path_schedule=m.drop_path_schedule,
                zero_init_last=m.zero_init_last, bn_momentum=m.bn_momentum, init=m.init)


def check_num_classes(config, expected: int) -> None:
    # The head's size comes from the dataset; a config that says otherwise is a mistake worth stopping for.
    if config.model.num_classes != expected:
        raise ConfigError(f"model.num_classes={config.model.num_classes}, but task {config.task.name} has {expected} "
                          f"outputs: set model.num_classes={expected}")
