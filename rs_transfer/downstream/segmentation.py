"""Semantic segmentation, what the tasks pascal_seg (Pascal VOC 2012, 21 classes, optional SBD trainaug;
rs_transfer/downstream/pascal_seg.py), ade_seg (ADE20K, 150 classes; ade_seg.py) and folder_seg (the user's own
image/mask folders; folder_seg.py) share: the dataset over (image, label) items, the FPN model, the mIoU evaluator
and the predictor. Each task's readers (its layout, its label format, its class names) live in its own module.

Importing this module imports no torch (pascal_seg, ade_seg and folder_seg declare their TASK with its names before
torch is loaded): each function imports what it needs; the model is fpn.SegmentationModel.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from rs_transfer.downstream.config import arch_args, check_num_classes
from rs_transfer.downstream.data import IGNORE, read_image
from rs_transfer.downstream.registry import metric_suffix, section_suffix
from rs_transfer.downstream.scenes import voc_palette
from rs_transfer.errors import DataError
from rs_transfer.predictor import (Predictor, name_classes, output_path, overlay_classes, palette_png, save_png,
                                 save_rgb, visualizer)
from rs_transfer.predictor import read_image as read_image_file

if TYPE_CHECKING:
    import torch
    from torch import nn

    from rs_transfer.downstream.dense_inference import Inference
    from rs_transfer.downstream.fpn import SegmentationModel
    from rs_transfer.engine.task import Task

FILLS = {"image": 0, "mask": IGNORE}
METRIC = "miou"  # single-scale whole-image; other inference adds a suffix (metric_name)


def metric_name(section) -> str:
    """The primary metric of a run with this task section (dataclass or config.yaml dict): "miou", "miou_slide",
    "miou_ms_flip", ... (registry.metric_suffix)."""
    return METRIC + section_suffix(section)


def seg_collate(samples: list) -> dict:
    from rs_transfer.downstream.transforms import pad_collate

    batch = pad_collate(samples, FILLS)
    batch["mask"] = batch["mask"].long()
    return batch


class SegmentationSet:
    """items: [(image path, (label path, label reader))]; returns {"image": uint8 3xHxW, "mask": uint8 HxW}
    after `transform`. Readers are module-level functions so the set pickles into loader workers.

    No torch `Dataset` base: a map-style dataset is any object with `__getitem__` and `__len__` (torch.utils.data),
    which DataLoader, Subset and the engine accept, and the base would import torch with this module."""

    def __init__(self, items: list, num_classes: int, transform=None):
        self.items = items
        self.num_classes = num_classes
        self.transform = transform

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        import torch
        from torchvision import tv_tensors

        image_path, (label_path, read_label) = self.items[index]
        image = read_image(image_path)
        label = read_label(label_path)
        if label.shape != tuple(image.shape[-2:]):
            raise DataError(f"label {label_path} is {label.shape}, image {image_path} is {tuple(image.shape[-2:])}")
        bad = (label >= self.num_classes) & (label != IGNORE)
        if bad.any():
            raise DataError(
                f"label {label_path} has class {int(label[bad].max())}: expected 0..{self.num_classes - 1} or {IGNORE}"
            )
        sample = {"image": image, "mask": tv_tensors.Mask(torch.from_numpy(label.astype(np.uint8)))}
        return self.transform(sample) if self.transform else sample


def make_evaluator(val_set, num_classes: int, batch_size: int, num_workers: int = 0, class_names=None,
                   inference: Inference | None = None):
    """mIoU of `model(batch)` (eval mode: logits (N, classes, H, W) at the label's size) over `val_set`, predicted
    as `inference` says (dense_inference.infer: whole or slide, TTA), each rank a contiguous part, confusion counts
    reduced over ranks (metrics.MeanIoU, torchmetrics' MulticlassJaccardIndex; label 255 ignored):
    {"miou", "iou/<class>"} as fractions, both suffixed by the inference ("miou_slide", "iou_slide/<class>", ...;
    registry.metric_suffix; None: whole-image, no TTA). Raises DataError when every pixel is ignore."""
    import torch

    from rs_transfer.downstream.dense_inference import Inference, rename_metrics
    from rs_transfer.downstream.metrics import MeanIoU
    from rs_transfer.engine.device import model_device, to_device
    from rs_transfer.engine.loader import eval_batches

    inference = inference or Inference()
    suffix = metric_suffix(inference.mode, inference.tta)

    def evaluate(model: nn.Module) -> dict:
        device = model_device(model)
        metric = MeanIoU(num_classes, device=device)
        with torch.no_grad():
            for batch in eval_batches(val_set, batch_size, seg_collate, num_workers, device):
                batch = to_device(batch, device)
                metric.update(seg_outputs(model, batch["image"], inference).argmax(1), batch["mask"])
        return rename_metrics(metric.compute(class_names), suffix)

    return evaluate


def seg_outputs(model: nn.Module, images: torch.Tensor, inference: Inference) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> (N, classes, H, W): logits (tta "none") or mean probabilities (flip, ms_flip), whose
    argmax is the prediction (dense_inference.infer)."""
    from rs_transfer.downstream.dense_inference import infer

    return infer(lambda x: model({"image": x}), images, inference, probabilities=True)


def build_model(config, num_classes: int) -> SegmentationModel:
    """The FPN segmentation model with `num_classes` outputs from model.* and task.* alone (no data read).
    Raises ConfigError for a model.num_classes other than `num_classes`, WeightsError for model.weights that do
    not fit."""
    from rs_transfer.downstream.fpn import SegmentationModel

    task_cfg = config.task
    check_num_classes(config, num_classes)
    return SegmentationModel(config.model.name, num_classes, weights=config.model.weights,
                             fpn_channels=task_cfg.fpn_channels, head_channels=task_cfg.head_channels,
                             **arch_args(config))


def predict(model, config, image: torch.Tensor) -> torch.Tensor:
    """uint8 (3, H, W) -> class indices int64 (H, W), the model's (0..classes-1): the argmax of the outputs at the
    image's own size, computed as the evaluator does (task.eval_mode, task.tta: seg_outputs)."""
    from rs_transfer.downstream.dense_inference import Inference
    from rs_transfer.engine.device import model_device

    outputs = seg_outputs(model, image[None].to(model_device(model)), Inference.of(config.task))
    return outputs[0].argmax(0).cpu()


def predictor(class_names, offset=0, background=None, source: str = "", labelled: bool = False) -> Predictor:
    """`rs-transfer predict` for a segmentation task whose dataset stores the model's class c as c + `offset` (ADE and
    folder_seg's task.reduce_zero_label: 1, their 0 is "unlabelled"). `class_names` (the model's, in index order)
    and `offset` are values, or for a task whose classes come from the user's data, functions of the run's config
    (class_names: config -> (names, where they come from); offset: config -> int).

    Its predictions are in the dataset's indices (the model's argmax + offset), so masks/<name>.png (a palette PNG,
    VOC's colours) holds the indices the user's masks hold; overlays/<name>.png paints each class present
    (torchvision's draw_segmentation_masks; class `background`, a dataset index, left unpainted) and, `labelled`,
    writes its name on it; the record lists the mask, the overlay and each class present with its share of the
    pixels."""
    palette = voc_palette()
    colours = {c: tuple(palette[3 * c: 3 * c + 3]) for c in range(len(palette) // 3)}
    skip = () if background is None else (background,)
    names_of = class_names if callable(class_names) else lambda config: (class_names, source)
    offset_of = offset if callable(offset) else lambda config: offset

    def names_by_index(config):
        # Indexed by the dataset's index: the record and the overlay's labels name the indices the masks hold.
        names, where = names_of(config)
        return (None,) * offset_of(config) + tuple(names), where

    def predict_indices(model, config, image: torch.Tensor) -> torch.Tensor:
        return predict(model, config, image) + offset_of(config)

    def draw(image: torch.Tensor, indices: torch.Tensor, names) -> torch.Tensor:
        overlay = overlay_classes(image, indices, colours, skip=skip)
        return name_classes(overlay, indices, names, colours, skip=skip) if labelled and names else overlay

    def write(out, name: str, image: torch.Tensor, indices: torch.Tensor, names) -> dict:
        mask = save_png(output_path(out, "masks", name, ".png"), palette_png(indices.numpy(), palette))
        overlay_path = save_rgb(output_path(out, "overlays", name, ".png"), draw(image, indices, names))
        values, counts = indices.unique(return_counts=True)
        present = [{"index": int(v), "class": names[int(v)], "fraction": int(n) / indices.numel()}
                   for v, n in zip(values.tolist(), counts.tolist())]
        return {"mask": mask.relative_to(out).as_posix(), "overlay": overlay_path.relative_to(out).as_posix(),
                "classes": present}

    return Predictor(read=read_image_file, predict=predict_indices, write=write, class_names=names_by_index,
                     draw=draw)


def build_segmentation(config, train_items: list, val_items: list, num_classes: int, class_names=None,
                       predictor: Predictor | None = None) -> Task:
    """The shared part of pascal_seg, ade_seg and folder_seg (which differ only in their data): datasets from
    (image, label) items, the FPN segmentation model, the mIoU evaluator, and (with the task's `predictor`) the
    overlays of a few validation images sent to TensorBoard at every evaluation."""
    from torchvision import tv_tensors

    from rs_transfer.downstream.dense_inference import Inference
    from rs_transfer.downstream.transforms import dense_train_transform
    from rs_transfer.engine.task import Task

    task_cfg = config.task
    check_num_classes(config, num_classes)
    transform = dense_train_transform(task_cfg.crop_size, (task_cfg.scale_min, task_cfg.scale_max),
                                      {tv_tensors.Image: 0, tv_tensors.Mask: IGNORE})
    train_set = SegmentationSet(train_items, num_classes, transform)
    val_set = SegmentationSet(val_items, num_classes)
    model = build_model(config, num_classes)
    evaluate = make_evaluator(val_set, num_classes, task_cfg.eval_batch_size, config.data.num_workers, class_names,
                              Inference.of(task_cfg))
    visualize = visualizer(val_set, predictor, config) if predictor is not None else None
    return Task(model=model, train_set=train_set, evaluate=evaluate, primary_metric=metric_name(task_cfg),
                collate_fn=seg_collate, visualize=visualize)
