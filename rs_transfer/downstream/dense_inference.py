"""Real-size inference for the per-pixel tasks (segmentation, depth): the whole image or overlapping windows
(`task.eval_mode`), with optional flip or multi-scale + flip test-time augmentation (`task.tta`). The evaluators of
segmentation.py and nyu_depth.py and their `predict` all call `infer`, so a metric and a prediction come from the
same computation.

Semantics follow mmsegmentation 1.x (docs/downstream.md, "Real-size inference"):
- slide: `EncoderDecoder.slide_inference`, `test_cfg=dict(mode='slide', crop_size, stride)`: windows of
  slide_crop x slide_crop every slide_stride pixels, the last window of a row or column moved back to end at the
  border, each window's outputs summed into place and divided by how many windows cover the pixel. A window is
  clipped to the image: an image (or side) smaller than the crop is one window of the image's own size, as in
  mmseg, so the network never sees padding and slide equals whole inference when the crop covers the image.
- flip / ms_flip: `SegTTAModel` with the `--tta` pipeline (`TestTimeAug`, img_ratios [0.5, ..., 1.75], flip): each
  view is resized by the scale (x the image size), predicted (whole or slide), flipped back, resized to the input
  size, and the views averaged. Segmentation averages softmax probabilities (`SegTTAModel.merge_preds`), so with
  TTA the output is mean probabilities, not logits (its argmax is the prediction either way); depth averages the
  depth maps in metres.
"""

from dataclasses import dataclass

import torch
from torch.nn import functional as F



@dataclass(frozen=True)
class Inference:
    """How to predict a full image: task.eval_mode, task.slide_crop, task.slide_stride (pixels), task.tta,
    task.tta_scales (x the image size; used by ms_flip only)."""

    mode: str = "whole"
    crop: int = 512
    stride: int = 341
    tta: str = "none"
    scales: tuple = (1.0,)

    @classmethod
    def of(cls, section) -> "Inference":
        """From a task section (DenseSection)."""
        return cls(section.eval_mode, section.slide_crop, section.slide_stride, section.tta, tuple(section.tta_scales))


def rename_metrics(metrics: dict, suffix: str, keep: tuple = ()) -> dict:
    """{"miou": .., "iou/cat": ..} -> {"miou_slide": .., "iou_slide/cat": ..}: the suffix after the name, before a
    per-class part; keys in `keep` (counts that do not depend on the inference, e.g. "pixels") unchanged."""
    if not suffix:
        return metrics
    renamed = {}
    for key, value in metrics.items():
        name, slash, rest = key.partition("/")
        renamed[key if key in keep else f"{name}{suffix}{slash}{rest}"] = value
    return renamed


def window_starts(size: int, crop: int, stride: int) -> list:
    """Start offsets of mmseg's windows along one side of `size` pixels: every `stride`, the last one moved back to
    end at the border, clipped at 0 (a side shorter than `crop` is one window from 0)."""
    count = max(size - crop + stride - 1, 0) // stride + 1
    return [max(min(i * stride + crop, size) - crop, 0) for i in range(count)]


def slide(forward, images: torch.Tensor, crop: int, stride: int) -> torch.Tensor:
    """(N, 3, H, W) -> (N, C, H, W): `forward` (images -> (N, C, h, w) at their size) on every window, summed into
    place and divided by the count of windows over each pixel (mmseg `slide_inference`). Raises nothing for any
    H, W >= 1: every pixel is covered by construction."""
    height, width = images.shape[-2:]
    total, count = None, images.new_zeros((1, 1, height, width), dtype=torch.float32)
    for top in window_starts(height, crop, stride):
        for left in window_starts(width, crop, stride):
            bottom, right = min(top + crop, height), min(left + crop, width)
            out = forward(images[..., top:bottom, left:right]).float()
            if total is None:
                total = out.new_zeros((*out.shape[:2], height, width))
            total[..., top:bottom, left:right] += out
            count[..., top:bottom, left:right] += 1
    return total / count


def predict_view(forward, images: torch.Tensor, inference: Inference) -> torch.Tensor:
    """One view at the images' size: the whole image, or windows."""
    if inference.mode == "slide":
        return slide(forward, images, inference.crop, inference.stride)
    return forward(images)


def resize(images: torch.Tensor, size: tuple) -> torch.Tensor:
    """Bilinear (mmseg resizes images with cv2 bilinear, and logits with bilinear, align_corners=False); the image
    stays float in [0, 255] (not re-quantised to uint8), which the model's Normalize takes."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    return F.interpolate(images.float(), size=size, mode="bilinear", align_corners=False)


def infer(forward, images: torch.Tensor, inference: Inference, probabilities: bool) -> torch.Tensor:
    """`forward`: images (N, 3, h, w) uint8 or [0, 255] float -> (N, C, h, w) at their size (segmentation logits,
    or depth with C = 1). Returns (N, C, H, W) at the input's size: with tta "none" the view's output (logits for
    segmentation: the default, whole, is `forward(images)` itself); with flip / ms_flip the mean over views of
    softmax probabilities (`probabilities`, segmentation) or of the raw output (depth)."""
    if inference.tta == "none":
        return predict_view(forward, images, inference)
    size = tuple(images.shape[-2:])
    scales = inference.scales if inference.tta == "ms_flip" else (1.0,)
    total = None
    for scale in scales:
        # mmcv's rescale: int(side * scale + 0.5), at least one pixel
        scaled = resize(images, tuple(max(int(side * scale + 0.5), 1) for side in size))
        for flip in (False, True):
            view = scaled.flip(-1) if flip else scaled
            out = predict_view(forward, view, inference).float()
            out = out.flip(-1) if flip else out
            out = resize(out, size)
            out = out.softmax(1) if probabilities else out
            total = out if total is None else total + out
    return total / (2 * len(scales))
