"""Task metrics, each accumulated per rank and reduced over ranks before it is read.

- mIoU: one torchmetrics `MulticlassJaccardIndex(ignore_index=...)` over one confusion matrix for the whole set
  (the VOC/ADE convention; its `segmentation.MeanIoU` averages per image instead). Classes absent from both
  prediction and ground truth are left out of the mean, as in the VOC devkit (and its average="macro").
- VOC07 AP50 with 11-point interpolation: our own, because no maintained implementation exists outside
  detectron2 (not on PyPI). It follows the devkit's `VOCevaldet` / detectron2's `voc_eval`: detections sorted by
  score, each matched to the ground truth box of highest IoU in its image; IoU > 0.5 with an unclaimed box is a
  true positive, with an already claimed box a false positive (duplicate), with a `difficult` box neither.
  Boxes are continuous (x0, y0, x1, y1); XML boxes enter as (xmin - 1, ymin - 1, xmax, ymax), which gives the
  same IoU as the devkit's "+1" pixel convention.
- COCO box AP (coco_det): pycocotools' COCOeval, the COCO API itself, so the numbers are the field's reference
  numbers: AP@[.5:.95] (`map`), AP50, AP75 with 101-point interpolated precision, 100 detections per image, `iscrowd`
  regions matched as COCO matches them (a detection on a crowd region is neither a true nor a false positive).
- Depth: delta < 1.25 (fraction of valid pixels with max(pred/gt, gt/pred) < 1.25), abs-rel, RMSE, averaged per
  image then over images (BTS and AdaBins `compute_errors`, the published NYU numbers) or pooled over all pixels of
  the set; non-finite predictions counted and evaluated as BTS and AdaBins do (`depth_sums`).

A metric with nothing to measure (no labelled pixel, no ground-truth box, no valid depth pixel in the whole
evaluation set) is undefined: it raises DataError instead of returning NaN, infinity or a zero that reads
like a result.

Importing this module imports no torch (nyu_depth's config section names DEPTH_AVERAGES before torch is loaded):
the functions that need torch or torchmetrics import them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from rs_transfer.downstream.data import IGNORE
from rs_transfer.errors import DataError

if TYPE_CHECKING:
    import torch


class MeanIoU:
    """Whole-set confusion matrix; `compute()` syncs it over ranks (torchmetrics does the all-reduce, so every
    rank must call it)."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE, device="cpu"):
        from torchmetrics.classification import MulticlassJaccardIndex

        self.ignore_index = ignore_index
        # Per-class IoU, NaN for a class absent from both prediction and ground truth: the mean over the others is
        # torchmetrics' average="macro", from the same matrix.
        self.iou = MulticlassJaccardIndex(num_classes, average="none", ignore_index=ignore_index,
                                          validate_args=False, zero_division=float("nan")).to(device)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """pred, target: class indices of the same shape (any), target `ignore_index` where unlabelled."""
        self.iou.update(pred, target)

    def compute(self, class_names=None) -> dict:
        """{"miou": ..., "iou/<class>": ...} as floats; classes absent from prediction and truth are not listed.

        Raises DataError when no pixel of the set has a label other than ignore (every class is absent)."""
        per_class = self.iou.compute()
        present = ~per_class.isnan()
        if not present.any():
            raise DataError(f"segmentation evaluation found no labelled pixel (every pixel is {self.ignore_index}, "
                               "ignore): mIoU is undefined; check the label files of the evaluation split")
        metrics = {"miou": float(per_class[present].mean())}
        for index in present.nonzero().flatten().tolist():
            metrics[f"iou/{class_names[index] if class_names else index}"] = float(per_class[index])
        return metrics


DEPTH_AVERAGES = ("images", "pixels")  # task.depth_average
# depth_sums' entries, summed over batches and ranks: the pooled sums over pixels, the sums of per-image values over
# images (each image's mean over its valid pixels, its RMSE the root of its own mean), the non-finite counts
DEPTH_SUMS = ("pixels", "pixels_delta1", "pixels_abs_rel", "pixels_squared", "images", "images_delta1",
              "images_abs_rel", "images_rmse", "nonfinite_pixels", "nonfinite_images")


def depth_sums(pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor, depth_min: float,
               depth_max: float) -> torch.Tensor:
    """float64 (len(DEPTH_SUMS),): this batch's sums for `depth_metrics`. pred, gt (metres), valid (bool): (N, ...)
    of the same shape, one image per index of the first dimension; an image without a valid pixel counts nowhere.

    Predictions are clamped to (depth_min, depth_max); a non-finite one on a valid pixel is counted
    (nonfinite_pixels, and its image in nonfinite_images) and then evaluated as BTS (pytorch/bts_eval.py `eval`) and
    AdaBins (evaluate.py) evaluate it: NaN as depth_min, +inf as depth_max (-inf as depth_min), so every error stays
    a finite number next to the count instead of a NaN RMSE or a silent delta1 miss."""
    import torch

    images = pred.shape[0]
    valid = valid.reshape(images, -1)
    pred, gt = pred.reshape(images, -1).double(), gt.reshape(images, -1).double()
    nonfinite = ~torch.isfinite(pred) & valid
    pred = torch.nan_to_num(pred, nan=depth_min, posinf=depth_max, neginf=depth_min).clamp(depth_min, depth_max)
    # pixels outside `valid` (gt 0 = no measurement) are set to 1 m so that nothing divides by zero, then left out
    pred, gt = torch.where(valid, pred, 1.0), torch.where(valid, gt, 1.0)
    ratio = torch.maximum(pred / gt, gt / pred)
    pixels = valid.sum(1).double()
    delta1 = ((ratio < 1.25) & valid).sum(1).double()
    abs_rel = torch.where(valid, (pred - gt).abs() / gt, 0.0).sum(1)
    squared = torch.where(valid, (pred - gt) ** 2, 0.0).sum(1)
    seen, count = pixels > 0, pixels.clamp(min=1)
    return torch.stack([
        pixels.sum(), delta1.sum(), abs_rel.sum(), squared.sum(),
        seen.sum().double(), (delta1 / count)[seen].sum(), (abs_rel / count)[seen].sum(),
        (squared / count).sqrt()[seen].sum(),
        nonfinite.sum().double(), nonfinite.any(1).sum().double(),
    ])


def depth_metrics(sums: torch.Tensor, valid: str = "valid ground-truth depth", average: str = "images") -> dict:
    """Reduce `depth_sums` over ranks (call on every rank) and turn them into metrics: "delta1", "abs_rel", "rmse"
    averaged as `average` says ("images": each image's value, then the mean over images, as BTS and AdaBins
    `compute_errors` and the published NYU numbers; "pixels": pooled over every valid pixel of the set), both
    averages also under explicit names ("delta1_images", ..., "delta1_pixels", ...), "pixels" and "images" (the
    counts evaluated), "nonfinite_pixels" and "nonfinite_images" (fractions of them whose prediction was NaN or
    infinite). Summed per image and count over ranks, so the per-image mean is the one of the whole set.

    Raises DataError on every rank when no pixel was valid; `valid` says which pixels count, for the message."""
    from rs_transfer.engine.distributed import all_reduce_sum

    totals = dict(zip(DEPTH_SUMS, all_reduce_sum(sums).tolist()))
    pixels, images = totals["pixels"], totals["images"]
    if pixels == 0:
        raise DataError(f"depth evaluation found no {valid}: delta1, abs_rel and rmse are undefined; check "
                           "task.depth_min/depth_max (metres) and the depth files (h5: metres, BTS PNGs: millimetres)")
    by = {
        "images": {"delta1": totals["images_delta1"] / images, "abs_rel": totals["images_abs_rel"] / images,
                   "rmse": totals["images_rmse"] / images},
        "pixels": {"delta1": totals["pixels_delta1"] / pixels, "abs_rel": totals["pixels_abs_rel"] / pixels,
                   "rmse": (totals["pixels_squared"] / pixels) ** 0.5},
    }
    metrics = dict(by[average])
    for kind in DEPTH_AVERAGES:
        metrics.update({f"{name}_{kind}": value for name, value in by[kind].items()})
    metrics.update(pixels=int(pixels), images=int(images), nonfinite_pixels=totals["nonfinite_pixels"] / pixels,
                   nonfinite_images=totals["nonfinite_images"] / images)
    return metrics


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    x0 = np.maximum(box[0], boxes[:, 0])
    y0 = np.maximum(box[1], boxes[:, 1])
    x1 = np.minimum(box[2], boxes[:, 2])
    y1 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / (area + areas - inter)


def voc07_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """11-point interpolated AP: mean over t in {0, 0.1, ..., 1} of the best precision at recall >= t."""
    ap = 0.0
    for t in np.linspace(0.0, 1.0, 11):
        above = precision[recall >= t]
        ap += (above.max() if above.size else 0.0) / 11.0
    return float(ap)


def class_ap(detections: list, ground_truth: dict, iou_threshold: float = 0.5) -> float | None:
    """AP of one class.

    detections: [(image_id, score, box)]; ground_truth: image_id -> (boxes (N, 4), difficult (N,) bool).
    Returns None when the class has no non-difficult ground truth (it is left out of the mean, as detectron2's
    evaluator would otherwise divide by zero).
    """
    positives = sum(int((~difficult).sum()) for _, difficult in ground_truth.values())
    if positives == 0:
        return None
    claimed = {image: np.zeros(len(boxes), dtype=bool) for image, (boxes, _) in ground_truth.items()}
    order = sorted(range(len(detections)), key=lambda i: -detections[i][1])
    tp = np.zeros(len(order))
    fp = np.zeros(len(order))
    for rank, index in enumerate(order):
        image, _, box = detections[index]
        boxes, difficult = ground_truth.get(image, (np.zeros((0, 4)), np.zeros(0, dtype=bool)))
        if len(boxes) == 0:
            fp[rank] = 1
            continue
        overlaps = box_iou(np.asarray(box, dtype=np.float64), np.asarray(boxes, dtype=np.float64))
        best = int(overlaps.argmax())
        if overlaps[best] > iou_threshold:
            if difficult[best]:
                continue
            if claimed[image][best]:
                fp[rank] = 1
            else:
                tp[rank] = 1
                claimed[image][best] = True
        else:
            fp[rank] = 1
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    recall = tp / positives
    precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return voc07_ap(recall, precision)


def voc07_map(detections: list, ground_truth: dict, class_names: list) -> dict:
    """detections: [(image_id, class_index, score, box)]; ground_truth: image_id -> (boxes, labels, difficult).

    Returns ap50 (mean over classes present in the ground truth) and ap50_per_class (None for absent classes).
    Raises DataError when no class has a non-difficult ground-truth box (AP50 would be undefined).
    """
    per_class = []
    for c in range(len(class_names)):
        gt = {}
        for image, (boxes, labels, difficult) in ground_truth.items():
            keep = np.asarray(labels) == c
            gt[image] = (np.asarray(boxes, dtype=np.float64).reshape(-1, 4)[keep], np.asarray(difficult, dtype=bool)[keep])
        dets = [(image, score, box) for image, label, score, box in detections if label == c]
        per_class.append(class_ap(dets, gt))
    present = [ap for ap in per_class if ap is not None]
    if not present:
        raise DataError(f"detection evaluation found no non-difficult ground-truth box in {len(ground_truth)} "
                           "images: AP50 is undefined; check the annotations of the test set")
    return {
        "ap50": float(np.mean(present)),
        "ap50_per_class": dict(zip(class_names, per_class)),
    }


def coco_box_ap(ground_truth: dict, detections: list) -> dict:
    """COCO box AP with pycocotools' COCOeval (iouType "bbox", its default parameters).

    ground_truth: a COCO instances dict {"images": [{"id", "width", "height"}], "categories": [{"id", "name"}],
    "annotations": [{"id", "image_id", "category_id", "bbox": [x, y, w, h], "area", "iscrowd"}]}, every image of the
    evaluation set (images without annotations count: detections there are false positives); detections: COCO
    results [{"image_id", "category_id", "bbox": [x, y, w, h] (pixels), "score"}].
    Returns {"map": AP@[.5:.95], "ap50", "ap75", "per_category": {category id: AP@[.5:.95], or None for a category
    without a non-crowd box}} as fractions. Raises DataError when no category has a non-crowd box (AP undefined).
    """
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    def index(dataset: dict) -> COCO:
        coco = COCO()  # built from the dicts (COCO.loadRes fails on an empty detection list)
        coco.dataset = dataset
        coco.createIndex()
        return coco

    results = [{**d, "id": i + 1, "area": d["bbox"][2] * d["bbox"][3], "iscrowd": 0} for i, d in enumerate(detections)]
    with contextlib.redirect_stdout(io.StringIO()):  # the COCO API prints its progress and the summary table
        evaluation = COCOeval(index(ground_truth), index({**ground_truth, "annotations": results}), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    if evaluation.stats[0] < 0:
        raise DataError(f"detection evaluation found no non-crowd ground-truth box in {len(ground_truth['images'])} "
                        "images: AP is undefined; check the annotations of the evaluation set")
    # precision: (IoU thresholds, recall points, categories, area ranges, max detections); area "all", 100 detections
    precision = evaluation.eval["precision"][:, :, :, 0, -1]
    per_category = {}
    for k, category_id in enumerate(evaluation.params.catIds):
        values = precision[:, :, k]
        per_category[category_id] = float(values[values > -1].mean()) if (values > -1).any() else None
    return {"map": float(evaluation.stats[0]), "ap50": float(evaluation.stats[1]), "ap75": float(evaluation.stats[2]),
            "per_category": per_category}
