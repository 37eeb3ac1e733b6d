"""Object detection, what the tasks pascal_det (Pascal VOC; rs_transfer/downstream/pascal_det.py) and coco_det (the
user's COCO JSON; coco_det.py) share: the Faster R-CNN (`Detector`, built from a run config by `detector`), its
test-time augmentation (`detect_with_tta`), the training transform and the collate. Each task's readers, evaluator,
section and predictor live in its own module, which imports this one inside its builders: importing a task module
imports no torch (its config and data layout are checked first), this module does.

Model: torchvision's FasterRCNN on our FPN P3-P7 (fpn.py): RPN with one anchor size per level (3 aspect ratios),
MultiScaleRoIAlign over P3-P7 (7x7), the "4conv1fc" box head (FastRCNNConvFCHead: 4 x conv 3x3 + BN + ReLU, FC).
"""

import torch
from torch import nn
from torchvision import tv_tensors
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign, batched_nms
from torchvision.transforms import v2
from torchvision.transforms.v2.functional import horizontal_flip_bounding_boxes

from rs_transfer.downstream.config import arch_args
from rs_transfer.downstream.fpn import LEVELS, BackboneFPN
from rs_transfer.downstream.pascal_det import TTA_SCALES
from rs_transfer.downstream.transforms import ScaleJitter
from rs_transfer.errors import DataError
from rs_transfer.models.normalize import IMAGENET_MEAN, IMAGENET_STD


def _labels_and_difficult(sample):
    return sample["labels"], sample["difficult"]


def train_transform(crop_size: int, scale_range, labels_getter=_labels_and_difficult) -> v2.Compose:
    """Scale jitter, random crop, flip; then the boxes cropped away or to < 1 px are dropped with the entries
    `labels_getter` names (VOC: labels and difficult; "default": the sample's "labels")."""
    return v2.Compose([
        ScaleJitter((crop_size, crop_size), scale_range=tuple(scale_range)),
        v2.RandomCrop(crop_size, pad_if_needed=True, fill=0),
        v2.RandomHorizontalFlip(),
        v2.SanitizeBoundingBoxes(labels_getter=labels_getter),
    ])


def det_collate(samples: list) -> dict:
    return {
        "images": [s["image"].as_subclass(torch.Tensor) for s in samples],
        "targets": [{"boxes": s["boxes"].as_subclass(torch.Tensor), "labels": s["labels"] + 1} for s in samples],
        "ids": [s["id"] for s in samples],
    }


class Detector(nn.Module):
    """batch {"images", "targets"} -> {"loss", RPN and box losses} in train mode; torchvision's detections
    (boxes in original pixels, labels 1..num_classes, scores) in eval mode, merged over the views of `tta` unless it
    is "none" (`detect_with_tta`)."""

    def __init__(self, backbone: str, num_classes: int = 20, weights=None, fpn_channels=256, fc_channels=1024,
                 anchor_sizes=(32, 64, 128, 256, 512), train_size=896, eval_size=896, score_thresh=0.001,
                 detections_per_img=100, rois_per_image=512, tta="none", tta_scales=TTA_SCALES, **arch):
        super().__init__()
        if len(anchor_sizes) != len(LEVELS):
            raise DataError(f"task.anchor_sizes needs one size per level {LEVELS}, got {list(anchor_sizes)}")
        body = BackboneFPN(backbone, weights=weights, channels=fpn_channels, **arch)
        anchors = AnchorGenerator(tuple((int(s),) for s in anchor_sizes), ((0.5, 1.0, 2.0),) * len(LEVELS))
        box_head = FastRCNNConvFCHead((fpn_channels, 7, 7), [fpn_channels] * 4, [fc_channels], norm_layer=nn.BatchNorm2d)
        self.train_size, self.eval_size = train_size, eval_size
        self.tta, self.tta_scales = tta, tuple(tta_scales)
        self.detector = FasterRCNN(
            body, num_classes=None, rpn_anchor_generator=anchors,
            box_roi_pool=MultiScaleRoIAlign(list(LEVELS), output_size=7, sampling_ratio=2),
            box_head=box_head, box_predictor=FastRCNNPredictor(fc_channels, num_classes + 1),
            min_size=train_size, max_size=train_size, image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD),
            box_score_thresh=score_thresh, box_detections_per_img=detections_per_img,
            box_batch_size_per_image=rois_per_image,
        )

    def forward(self, batch: dict):
        images = [image.float() / 255 for image in batch["images"]]
        if not self.training:
            if self.tta == "none":
                return self.detect(images, self.eval_size)
            return detect_with_tta(self, images)
        self._resize_to(self.train_size)
        losses = self.detector(images, batch["targets"])
        return {"loss": sum(losses.values()), **losses}

    def _resize_to(self, size: int) -> None:
        # min_size = max_size: torchvision's transform scales the longer side to `size`
        self.detector.transform.min_size, self.detector.transform.max_size = (size,), size

    def detect(self, images: list, size: int) -> list:
        """Detections of float (3, H, W) images in [0, 1] resized to longer side `size`, boxes in their pixels."""
        self._resize_to(size)
        return self.detector(images)


def detector(config, num_classes: int) -> Detector:
    """The Faster R-CNN of task.* (a pascal_det.DetectorSection) and model.* with `num_classes` classes (labels
    1..num_classes, 0 = background), no data read. Raises WeightsError for model.weights that do not fit."""
    task_cfg = config.task
    return Detector(config.model.name, num_classes, weights=config.model.weights, fpn_channels=task_cfg.fpn_channels,
                    fc_channels=task_cfg.det_fc_channels, anchor_sizes=tuple(task_cfg.anchor_sizes),
                    train_size=task_cfg.crop_size, eval_size=task_cfg.det_eval_size,
                    score_thresh=task_cfg.det_score_thresh, detections_per_img=task_cfg.det_max_per_image,
                    rois_per_image=task_cfg.det_rois_per_image, tta=task_cfg.tta, tta_scales=task_cfg.tta_scales,
                    **arch_args(config))


def tta_views(tta: str, scales) -> list:
    """[(scale, flipped)] in detectron2's DatasetMapperTTA order: each scale alone, then mirrored. "flip" is the one
    scale 1.0 (task.det_eval_size) with and without the mirror; "ms_flip" every scale of `scales`."""
    return [(scale, flipped) for scale in ((1.0,) if tta == "flip" else scales) for flipped in (False, True)]


def merge_detections(parts: list, nms_thresh: float, max_per_image: int) -> dict:
    """One image's detections from several test augmentations ([{"boxes" (K, 4) in the image's pixels, "labels",
    "scores"}]) merged as detectron2's GeneralizedRCNNWithTTA._merge_detections does: concatenated, per-class NMS at
    `nms_thresh` (the detector's own test NMS), the `max_per_image` highest scores kept, highest first."""
    boxes = torch.cat([part["boxes"] for part in parts])
    scores = torch.cat([part["scores"] for part in parts])
    labels = torch.cat([part["labels"] for part in parts])
    keep = batched_nms(boxes.float(), scores.float(), labels, nms_thresh)[:max_per_image]
    return {"boxes": boxes[keep], "labels": labels[keep], "scores": scores[keep]}


def detect_with_tta(model: Detector, images: list) -> list:
    """model.tta's detections of float (3, H, W) images in [0, 1], one dict per image as torchvision's ("boxes"
    (K, 4) x1 y1 x2 y2 in the image's pixels, "labels", "scores"), K <= the detector's detections per image.

    Source: detectron2 modeling/test_time_augmentation.py (GeneralizedRCNNWithTTA with DatasetMapperTTA): the
    detector runs on every augmented input (`tta_views`: each scale = a test size of scale x
    task.det_eval_size, as detectron2 scales its min size; each with and without the horizontal flip), its boxes
    are mapped back to the original image (torchvision undoes the resize; the flip is undone here), and the union is
    merged by `merge_detections` at the detector's test NMS threshold (0.5) keeping task.det_max_per_image."""
    found = [[] for _ in images]
    for scale, flipped in tta_views(model.tta, model.tta_scales):
        inputs = [image.flip(-1) for image in images] if flipped else images
        outputs = model.detect(inputs, max(1, round(model.eval_size * scale)))
        for parts, image, out in zip(found, images, outputs):
            if flipped:
                out = {**out, "boxes": horizontal_flip_bounding_boxes(
                    out["boxes"], tv_tensors.BoundingBoxFormat.XYXY, tuple(image.shape[-2:]))}
            parts.append(out)
    heads = model.detector.roi_heads
    return [merge_detections(parts, heads.nms_thresh, heads.detections_per_img) for parts in found]
