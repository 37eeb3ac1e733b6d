"""Pascal VOC detection: torchvision's Faster R-CNN on our FPN P3-P7, AP50 with the VOC07 11-point AP.

Layout: data.root holds VOCdevkit/ (or VOC2007/, VOC2012/ directly): VOC<year>/Annotations/<id>.xml,
JPEGImages/<id>.jpg, ImageSets/Main/<split>.txt. Train on task.det_train_sets (default 2007 + 2012 trainval),
test on task.det_test_set (2007 test). XML boxes are 1-based inclusive pixels; they become continuous
(xmin - 1, ymin - 1, xmax, ymax). `difficult` boxes are left out of training (as mmdetection does) and ignored
by the AP (as the devkit does); images without objects are kept (empty targets train the RPN's background).

Model (detection.py's `Detector`, shared with coco_det; the builders import it, so importing this module imports no
torch): RPN with one anchor size per level (task.anchor_sizes, 3 aspect ratios) on P3-P7, MultiScaleRoIAlign over
P3-P7 (7x7), the "4conv1fc" box head (torchvision's FastRCNNConvFCHead: 4 x conv 3x3 + BN + ReLU, FC).
Training images are the scale-jittered crops (no further resize); test images are resized so the longer side
is task.det_eval_size, and boxes come back in original pixels. Test-time augmentation (task.tta: flip, multi-scale
flip) follows detectron2's GeneralizedRCNNWithTTA (`detection.detect_with_tta`); its metrics are named for it
(`ap50_flip`). `check_data` checks the layout's folders and split files without torch.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from rs_transfer.config import (MAX_BATCH, MAX_CHANNELS, MAX_PIXELS, ConfigError, above, at_least, at_most, checked,
                                one_of)
from rs_transfer.downstream.config import CropSection, FinetuneConfig, check_num_classes
from rs_transfer.downstream.data import find_dir, read_image, read_split, require
from rs_transfer.downstream.protocol import Protocol
from rs_transfer.downstream.registry import TTA_MODES, TransferTaskDeclaration, metric_suffix
from rs_transfer.downstream.scenes import scene, visible_objects
from rs_transfer.errors import DataError
from rs_transfer.predictor import Predictor, output_path, save_rgb, visualizer
from rs_transfer.predictor import read_image as read_image_file

if TYPE_CHECKING:
    import torch

    from rs_transfer.downstream.detection import Detector
    from rs_transfer.engine.task import Task

CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
PROTOCOL = Protocol("ap50", (5000, 10000, 20000), 32, 896, "VOC det AP50")
# detectron2's TEST.AUG.MIN_SIZES (400, 500, ..., 1200) over its single-scale MIN_SIZE_TEST (800): the test sizes of
# task.tta=ms_flip, relative to task.det_eval_size
TTA_SCALES = (0.5, 0.625, 0.75, 0.875, 1.0, 1.125, 1.25, 1.375, 1.5)


def _tta_sizes_in_range(task, prefix: str) -> None:
    if task.tta_scales is not None and not task.tta_scales:
        raise ConfigError(f"{prefix}tta_scales is empty: give at least one scale (1.0 is task.det_eval_size)")
    for scale in task.tta_scales or ():
        if not 1 <= round(task.det_eval_size * scale) <= MAX_PIXELS:
            raise ConfigError(f"{prefix}tta_scales holds {scale}: with {prefix}det_eval_size={task.det_eval_size} "
                              f"that tests at {round(task.det_eval_size * scale)} px; it must be 1..{MAX_PIXELS}")


@dataclass
class DetectorSection(CropSection):
    """The Faster R-CNN's keys, which every detection task (pascal_det, coco_det) has."""

    RELATIONS = CropSection.RELATIONS + (_tta_sizes_in_range,)

    anchor_sizes: list = checked(None, above(0), at_most(MAX_PIXELS), factory=lambda: [32, 64, 128, 256, 512])  # one per level, P3-P7
    det_eval_size: int = checked(896, at_least(1), at_most(MAX_PIXELS))  # test images: longer side resized to this
    det_fc_channels: int = checked(1024, at_least(1), at_most(MAX_CHANNELS))  # the box head's FC ("4conv1fc"); its convs are fpn_channels wide
    det_rois_per_image: int = checked(512, at_least(1), at_most(MAX_BATCH))  # RoIs sampled per training image for the box head (torchvision's default)
    det_score_thresh: float = checked(0.001, at_least(0))
    det_max_per_image: int = checked(100, at_least(1), at_most(MAX_BATCH))
    # test-time augmentation (detect_with_tta): "none", "flip" (the image and its mirror at det_eval_size) or
    # "ms_flip" (each of tta_scales x det_eval_size, with and without the mirror); metrics become ap50_flip, ...
    tta: str = checked("none", one_of(*TTA_MODES))
    tta_scales: list = checked(None, above(0), factory=lambda: list(TTA_SCALES))  # ms_flip's sizes, x det_eval_size


@dataclass
class PascalDetSection(DetectorSection):
    name: str = "pascal_det"
    det_train_sets: list = field(default_factory=lambda: ["2007:trainval", "2012:trainval"])
    det_test_set: str = "2007:test"


@dataclass
class PascalDetConfig(FinetuneConfig):
    task: PascalDetSection = field(default_factory=PascalDetSection)


def parse_annotation(path: Path) -> tuple:
    """(boxes (N, 4) float32 continuous xyxy, labels (N,) int64 in 0..19, difficult (N,) bool)."""
    try:
        root = ET.parse(require(path, "a VOC XML annotation")).getroot()
    except ET.ParseError as error:
        raise DataError(f"cannot parse {path}: {error}") from None
    boxes, labels, difficult = [], [], []
    for obj in root.findall("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in CLASSES:
            raise DataError(f"{path}: unknown class {name!r}: expected one of the 20 VOC classes")
        box = obj.find("bndbox")
        try:
            x0, y0, x1, y1 = (float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        except (AttributeError, TypeError, ValueError):
            raise DataError(f"{path}: an object {name!r} lacks a numeric bndbox xmin/ymin/xmax/ymax") from None
        boxes.append((x0 - 1, y0 - 1, x1, y1))
        labels.append(CLASSES.index(name))
        difficult.append(int(obj.findtext("difficult") or 0) == 1)
    return (np.asarray(boxes, dtype=np.float32).reshape(-1, 4), np.asarray(labels, dtype=np.int64),
            np.asarray(difficult, dtype=bool))


def voc_year_dir(root, year: str) -> Path:
    return find_dir(root, (f"VOCdevkit/VOC{year}", f"VOC{year}"), f"Pascal VOC {year} (a VOC{year} folder)")


def image_set(root, item) -> tuple:
    """(year, its VOC<year> folder, the ids of its ImageSets/Main/<split>.txt) of one "year:split" item. Raises
    ConfigError for an unset data.root, DataError for a malformed item or a missing folder or split file."""
    year, sep, split = str(item).partition(":")
    if not sep:
        raise DataError(f"bad image set {item!r}: expected YEAR:SPLIT, e.g. 2007:trainval")
    voc = voc_year_dir(root, year)
    ids = read_split(voc / "ImageSets" / "Main" / f"{split}.txt", f"VOC{year}/ImageSets/Main/{split}.txt (one id per line)")
    return year, voc, ids


def image_sets(root, sets) -> list:
    """[(image path, annotation path, id)] for "year:split" items."""
    items = []
    for item in sets:
        year, voc, ids = image_set(root, item)
        items += [(voc / "JPEGImages" / f"{i}.jpg", voc / "Annotations" / f"{i}.xml", f"{year}/{i}") for i in ids]
    return items


def check_data(config) -> None:
    """The VOC layout `build` reads, without torch and without opening an image or an annotation: for each set of
    task.det_train_sets and task.det_test_set, its VOC<year> folder, its ImageSets/Main/<split>.txt (the ids read)
    and the Annotations/ and JPEGImages/ folders beside them. Raises ConfigError for an unset data.root, DataError
    naming the first missing folder or file (as `build` does)."""
    task_cfg = config.task
    for item in [*task_cfg.det_train_sets, task_cfg.det_test_set]:
        year, voc, _ = image_set(config.data.root, item)
        require(voc / "Annotations", f"VOC{year}/Annotations/ (<id>.xml for every id of the image sets)")
        require(voc / "JPEGImages", f"VOC{year}/JPEGImages/ (<id>.jpg for every id of the image sets)")


# No torch Dataset base, so that importing this module imports no torch: a map-style dataset is any object with
# __getitem__ and __len__ (torch.utils.data's docs), which DataLoader, Subset and the engine accept.
class VOCDetection:
    """{"image": uint8 3xHxW, "boxes": BoundingBoxes, "labels", "difficult", "id"} after `transform`."""

    def __init__(self, items: list, transform=None, keep_difficult: bool = True):
        self.items = items
        self.transform = transform
        self.keep_difficult = keep_difficult

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        import torch
        from torchvision import tv_tensors

        image_path, xml_path, image_id = self.items[index]
        image = read_image(image_path)
        boxes, labels, difficult = parse_annotation(xml_path)
        if not self.keep_difficult:
            boxes, labels, difficult = boxes[~difficult], labels[~difficult], difficult[~difficult]
        sample = {
            "image": image,
            "boxes": tv_tensors.BoundingBoxes(torch.from_numpy(boxes), format="XYXY", canvas_size=tuple(image.shape[-2:])),
            "labels": torch.from_numpy(labels),
            "difficult": torch.from_numpy(difficult),
            "id": image_id,
        }
        return self.transform(sample) if self.transform else sample


def make_evaluator(test_set: VOCDetection, batch_size: int, num_workers: int = 0, tta: str = "none"):
    """VOC07 11-point AP50 of `model(batch)` (eval mode: torchvision detections, one dict per image with "boxes"
    (K, 4) x1 y1 x2 y2 in input pixels, "labels" (K,) 1-based, "scores" (K,)) over `test_set`, each rank a contiguous
    part, detections gathered to every rank: {"ap50", "ap50/<class>"} as fractions (difficult objects ignored,
    as in the VOC devkit), named for the model's test-time augmentation `tta` (task.tta: "ap50_flip", ...)."""
    import torch

    from rs_transfer.downstream.metrics import voc07_map
    from rs_transfer.engine.device import model_device, to_device
    from rs_transfer.engine.distributed import all_gather_list
    from rs_transfer.engine.loader import eval_batches

    def evaluate(model) -> dict:
        device = model_device(model)
        detections, truth = [], {}
        with torch.no_grad():
            for batch in eval_batches(test_set, batch_size, _eval_collate, num_workers, device):
                outputs = model(to_device({"images": batch["images"]}, device))
                for image_id, out, gt in zip(batch["ids"], outputs, batch["truth"]):
                    truth[image_id] = gt
                    for box, label, score in zip(out["boxes"].float().cpu().numpy(), out["labels"].cpu().tolist(),
                                                 out["scores"].float().cpu().tolist()):
                        detections.append((image_id, label - 1, score, box))
        detections = all_gather_list(detections)
        truth = dict(all_gather_list(list(truth.items())))
        result = voc07_map(detections, truth, list(CLASSES))
        ap50 = "ap50" + metric_suffix(tta=tta)
        metrics = {ap50: result["ap50"]}
        metrics.update({f"{ap50}/{name}": ap for name, ap in result["ap50_per_class"].items() if ap is not None})
        return metrics

    return evaluate


def _eval_collate(samples: list) -> dict:
    import torch

    return {
        "images": [s["image"].as_subclass(torch.Tensor) for s in samples],
        "ids": [s["id"] for s in samples],
        "truth": [(s["boxes"].numpy(), s["labels"].numpy(), s["difficult"].numpy()) for s in samples],
    }


def build_model(config) -> Detector:
    """The Faster R-CNN of task.* and model.* (eval mode: detections per image, see make_evaluator), no data read.
    Raises ConfigError for model.num_classes other than 20, WeightsError for model.weights that do not fit."""
    from rs_transfer.downstream.detection import detector

    check_num_classes(config, len(CLASSES))
    return detector(config, len(CLASSES))


def predict(model, config, image: torch.Tensor) -> dict:
    """uint8 (3, H, W) -> the evaluator's detections of the image: {"boxes" (K, 4) x1 y1 x2 y2 in the image's
    pixels, "labels" (K,) 1..20, "scores" (K,)}, on the CPU. The detector resizes (longer side
    task.det_eval_size; with task.tta its augmentations, `detection.detect_with_tta`) and maps the boxes back
    itself."""
    from rs_transfer.engine.device import model_device

    detections = model({"images": [image.to(model_device(model))]})[0]
    return {key: value.float().cpu() if value.is_floating_point() else value.cpu() for key, value in detections.items()}


DRAW_MIN_SCORE = 0.3  # boxes drawn on boxes/<name>.png; predictions.json holds every detection


def draw_detections(image: torch.Tensor, detections: dict, class_names) -> torch.Tensor:
    """uint8 (3, H, W): `image` with the boxes scoring at least DRAW_MIN_SCORE, labelled with class and score
    (torchvision's draw_bounding_boxes)."""
    from torchvision.utils import draw_bounding_boxes

    keep = detections["scores"] >= DRAW_MIN_SCORE
    labels = [f"{class_names[label - 1]} {score:.2f}"
              for label, score in zip(detections["labels"][keep].tolist(), detections["scores"][keep].tolist())]
    # torchvision warns when given no box; the image is then drawn as it is
    return draw_bounding_boxes(image, detections["boxes"][keep], labels=labels, width=2) if labels else image


def write_detections(out, name: str, image: torch.Tensor, detections: dict, class_names) -> dict:
    """The record {"detections": [{"class", "index" (0-based label: 0..19 for VOC), "score", "box": [x1, y1, x2, y2]
    (pixels)}], "drawn"} and boxes/<name>.png (`draw_detections`)."""
    records = [{"class": class_names[label - 1], "index": label - 1, "score": score, "box": box}
               for box, label, score in zip(detections["boxes"].tolist(), detections["labels"].tolist(),
                                            detections["scores"].tolist())]
    path = save_rgb(output_path(out, "boxes", name, ".png"), draw_detections(image, detections, class_names))
    return {"detections": records, "drawn": path.relative_to(out).as_posix(), "drawn_min_score": DRAW_MIN_SCORE}


def build(config) -> Task:
    """The pascal_det Task: VOC 2007+2012 trainval (task.det_train_sets) to VOC 2007 test, torchvision's Faster
    R-CNN on our FPN P3-P7 (eval mode: detections per image, see make_evaluator), VOC07 11-point AP50.
    Raises DataError for a missing or malformed VOC layout or annotation (naming the file), ConfigError for
    model.num_classes other than 20."""
    from rs_transfer.downstream.detection import det_collate, train_transform
    from rs_transfer.engine.task import Task

    task_cfg = config.task
    check_num_classes(config, len(CLASSES))
    train_set = VOCDetection(image_sets(config.data.root, task_cfg.det_train_sets),
                             train_transform(task_cfg.crop_size,
                                             (task_cfg.scale_min, task_cfg.scale_max)), keep_difficult=False)
    test_set = VOCDetection(image_sets(config.data.root, [task_cfg.det_test_set]))
    model = build_model(config)
    return Task(model=model, train_set=train_set,
                evaluate=make_evaluator(test_set, task_cfg.eval_batch_size, config.data.num_workers, task_cfg.tta),
                primary_metric=PROTOCOL.metric + metric_suffix(tta=task_cfg.tta), collate_fn=det_collate,
                visualize=visualizer(test_set, PREDICTOR, config))


SYNTHETIC_CLASSES = ("aeroplane", "cat", "person")  # the classes synthetic scenes draw


def _voc_xml(filename: str, year: str, height: int, width: int, objects: list) -> str:
    parts = [f"<annotation><folder>VOC{year}</folder><filename>{filename}</filename>",
             f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size><segmented>0</segmented>"]
    for name, (x0, y0, x1, y1), difficult in objects:
        parts.append(f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>"
                     f"<difficult>{int(difficult)}</difficult><bndbox><xmin>{x0 + 1}</xmin><ymin>{y0 + 1}</ymin>"
                     f"<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>")
    return "\n".join(parts) + "\n</annotation>\n"


def write_voc_det(root, train=48, test=12, size=(96, 128), seed=0) -> Path:
    """VOCdevkit/VOC2007 (trainval + test) and VOC2012 (trainval): Annotations XML (1-based inclusive boxes,
    some `difficult`), JPEGImages, ImageSets/Main. The first test image has no objects."""
    rng = np.random.default_rng(seed)
    splits = (("2007", "trainval", train - train // 2), ("2012", "trainval", train // 2), ("2007", "test", test))
    for year, split, count in splits:
        voc = Path(root) / "VOCdevkit" / f"VOC{year}"
        for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
            (voc / folder).mkdir(parents=True, exist_ok=True)
        ids = []
        for i in range(count):
            image_id = f"{split[:4]}{i:06d}" if year == "2007" else f"2012_{i:06d}"
            empty = split == "test" and i == 0
            image, _, objects = scene(rng, *size, len(SYNTHETIC_CLASSES), min_objects=0 if empty else 1,
                                      max_objects=0 if empty else 3)
            visible = [(SYNTHETIC_CLASSES[k], box, rng.random() < 0.1) for k, box, _ in visible_objects(objects, size)]
            Image.fromarray(image).save(voc / "JPEGImages" / f"{image_id}.jpg", quality=95)
            (voc / "Annotations" / f"{image_id}.xml").write_text(_voc_xml(f"{image_id}.jpg", year, *size, visible))
            ids.append(image_id)
        (voc / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return Path(root)


def write_synthetic(root, train: int, val: int):
    return write_voc_det(root, train=train, test=val)


PREDICTOR = Predictor(read=read_image_file, predict=predict, write=write_detections,
                      class_names=lambda config: (CLASSES, "the 20 VOC classes"), draw=draw_detections)

TASK = TransferTaskDeclaration(
    name="pascal_det", config=PascalDetConfig, build=build, protocol=PROTOCOL, write_synthetic=write_synthetic,
    build_model=build_model, predictor=PREDICTOR, check_data=check_data,
    # Table 5, percent: (backbone, method, pretraining epochs) -> value
    paper={("R152", "supervised", 90): 80.0, ("R152", "SimCLR", 800): 83.3, ("R152", "SimCLRv2", 800): 79.1,
           ("R152", "RS", 400): 82.2, ("R152 2x", "supervised", 90): 81.1, ("R152 2x", "SimCLR", 800): 85.3,
           ("R152 2x", "SimCLRv2", 800): 80.1, ("R152 2x", "RS", 400): 84.1},
)
