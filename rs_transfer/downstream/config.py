"""The fine-tuning config: the shared `RunConfig` (model, data, train, output_dir) plus a `task` section.

One schema serves every task; keys a task does not use are ignored by it (e.g. `det_*` by segmentation), which
keeps `configs/downstream/<task>.yaml` flat and lets a `--config` file switch tasks without a second schema.
"""

from dataclasses import dataclass, field
from typing import Optional

from rs_transfer.config import ConfigError, DataConfig, RunConfig, above, at_least, checked, one_of, ordered


def _jittered_crop_has_pixels(task, prefix: str) -> None:
    # scale jitter resizes to crop_size x scale: below one pixel torchvision's resize fails deep inside
    if task.crop_size * task.scale_min < 1:
        raise ConfigError(f"{prefix}scale_min={task.scale_min} with {prefix}crop_size={task.crop_size} scales images "
                          "to less than one pixel: raise scale_min")


@dataclass
class TaskConfig:
    RELATIONS = (ordered("scale_min", "scale_max"), ordered("depth_min", "depth_max", strict=True),
                 _jittered_crop_has_pixels)

    name: str = "pascal_seg"  # cifar100, pascal_seg, ade_seg, nyu_depth, pascal_det
    # training crop (segmentation 512, detection 896, depth 640 in the paper); at least the backbone's stride
    crop_size: int = checked(512, at_least(32))
    scale_min: float = checked(0.5, above(0))  # scale jitter range, relative to the crop
    scale_max: float = checked(2.0, above(0))
    image_size: int = checked(256, at_least(1))  # cifar100: images are resized to this (the paper: 256)
    fpn_channels: int = checked(256, at_least(1))
    head_channels: int = checked(256, at_least(1))  # width of the 3 conv layers of the dense head
    eval_batch_size: int = checked(8, at_least(1))
    # pascal_seg
    train_split: str = "train"  # ImageSets/Segmentation/<split>.txt, or "trainaug" (needs sbd_root)
    val_split: str = "val"
    sbd_root: Optional[str] = None  # folder holding SBD's dataset/cls/*.mat (benchmark_RELEASE)
    # nyu_depth
    nyu_format: str = checked("auto", one_of("auto", "h5", "bts"))  # "h5" (sparse-to-dense release), "bts" (sync PNGs + file lists) or "auto"
    depth_min: float = checked(1e-3, at_least(0))  # metres; ground truth outside (depth_min, depth_max) is not evaluated
    depth_max: float = checked(10.0, above(0))
    eigen_crop: bool = True  # evaluate inside the Eigen et al. crop (rows 45:471, cols 41:601 of 480x640)
    # pascal_det
    det_train_sets: list = field(default_factory=lambda: ["2007:trainval", "2012:trainval"])
    det_test_set: str = "2007:test"
    anchor_sizes: list = checked(None, above(0), factory=lambda: [32, 64, 128, 256, 512])  # one per level, P3-P7
    det_eval_size: int = checked(896, at_least(1))  # test images: longer side resized to this
    det_fc_channels: int = checked(1024, at_least(1))  # the box head's FC ("4conv1fc"); its convs are fpn_channels wide
    det_rois_per_image: int = checked(512, at_least(1))  # RoIs sampled per training image for the box head (torchvision's default)
    det_score_thresh: float = checked(0.001, at_least(0))
    det_max_per_image: int = checked(100, at_least(1))


@dataclass
class FinetuneData(DataConfig):
    synthetic_images: int = checked(48, at_least(2))  # --synthetic: training images written (validation gets a quarter)


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
    """Unset (None): take the task's count. Set: the head's size comes from the dataset, so a config that says
    otherwise is a mistake worth stopping for."""
    if config.model.num_classes is None:
        config.model.num_classes = expected
    elif config.model.num_classes != expected:
        raise ConfigError(f"model.num_classes={config.model.num_classes}, but task {config.task.name} has {expected} "
                          f"outputs: set model.num_classes={expected}")
