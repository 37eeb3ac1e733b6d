"""The fine-tuning config: the shared `RunConfig` (model, data, train, output_dir, seed) plus a `task` section.

Each task declares its own section (a dataclass built from the pieces below) and its own run config, e.g.
`class NYUDepthConfig(FinetuneConfig): task: NYUDepthSection`, in its module. A run loads the schema of the task
it runs, so a key of another task (`task.det_eval_size` in a depth config) is an error naming the key, not a value
silently ignored.
"""

from dataclasses import dataclass, field

from rs_transfer.config import (
    MAX_BATCH, MAX_CHANNELS, MAX_PIXELS, ConfigError, DataConfig, RunConfig, above, at_least, at_most, checked,
    one_of, only_with, ordered, record_inferred,
)
from rs_transfer.downstream.registry import EVAL_MODES, TTA_MODES


def _jittered_crop_has_pixels(task, prefix: str) -> None:
    # scale jitter resizes to crop_size x scale: below one pixel torchvision's resize fails deep inside
    if task.crop_size * task.scale_min < 1:
        raise ConfigError(f"{prefix}scale_min={task.scale_min} with {prefix}crop_size={task.crop_size} scales images "
                          "to less than one pixel: raise scale_min")


@dataclass
class TaskSection:
    """What every task's section has."""

    name: str = ""  # the task; set from --task
    eval_batch_size: int = checked(8, at_least(1), at_most(MAX_BATCH))


@dataclass
class CropSection(TaskSection):
    """Tasks trained on scale-jittered random crops on an FPN backbone (segmentation, depth, detection)."""

    RELATIONS = (ordered("scale_min", "scale_max"), _jittered_crop_has_pixels)

    # training crop (segmentation 512, detection 896, depth 640 in the paper); at least the backbone's stride
    crop_size: int = checked(512, at_least(32), at_most(MAX_PIXELS))
    scale_min: float = checked(0.5, above(0))  # scale jitter range, relative to the crop
    scale_max: float = checked(2.0, above(0))
    fpn_channels: int = checked(256, at_least(1), at_most(MAX_CHANNELS))


def _tta_scales_given(task, prefix: str) -> None:
    if not task.tta_scales:
        raise ConfigError(f"{prefix}tta_scales is empty: give at least one scale, e.g. [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]")


@dataclass
class DenseSection(CropSection):
    """Per-pixel tasks: the FPN's levels summed at stride 4, then a small conv head; evaluated and predicted on the
    whole image or in windows, with optional test-time augmentation (downstream/dense_inference.py)."""

    # the windows' and the scales' keys act only in their mode: set alone they were silently ignored
    RELATIONS = (*CropSection.RELATIONS, only_with("eval_mode", "slide", "slide_crop", "slide_stride"),
                 only_with("tta", "ms_flip", "tta_scales"), ordered("slide_stride", "slide_crop"), _tta_scales_given)

    head_channels: int = checked(256, at_least(1), at_most(MAX_CHANNELS))  # width of the 3 conv layers of the dense head
    # mmseg test_cfg mode: "whole" (the image at its size) or "slide" (windows, overlapping outputs averaged)
    eval_mode: str = checked("whole", one_of(*EVAL_MODES))
    slide_crop: int = checked(512, at_least(1), at_most(MAX_PIXELS))  # window side (mmseg crop_size (512, 512))
    slide_stride: int = checked(341, at_least(1), at_most(MAX_PIXELS))  # window step, <= slide_crop (mmseg stride (341, 341))
    tta: str = checked("none", one_of(*TTA_MODES))  # test-time augmentation (mmseg SegTTAModel)
    # ms_flip's scales, x the image size (mmseg's aug-test img_ratios)
    tta_scales: list = checked(None, above(0), at_most(8.0), factory=lambda: [0.5, 0.75, 1.0, 1.25, 1.5, 1.75])


@dataclass
class FinetuneData(DataConfig):
    synthetic_images: int = checked(48, at_least(2), at_most(MAX_BATCH))  # --synthetic: training images written (validation gets a quarter)


@dataclass
class FinetuneConfig(RunConfig):
    """The shared part of every task's run config; a task's config subclasses it with its own `task` section."""

    data: FinetuneData = field(default_factory=FinetuneData)
    task: TaskSection = field(default_factory=TaskSection)


def arch_args(config) -> dict:
    """The backbone's architecture switches from `model.*` (models.zoo.ArchArgs, the 2D and 3D networks' one set),
    for `create_model`."""
    from rs_transfer.models.zoo import ArchArgs

    return ArchArgs.from_config(config.model).as_dict()


def check_num_classes(config, expected: int) -> None:
    """Unset (None): take the task's count. Set: the head's size comes from the dataset, so a config that says
    otherwise is a mistake worth stopping for."""
    if config.model.num_classes is None:
        record_inferred(config, "model.num_classes", expected)
    elif config.model.num_classes != expected:
        raise ConfigError(f"model.num_classes={config.model.num_classes}, but task {config.task.name} has {expected} "
                          f"outputs: set model.num_classes={expected}")
