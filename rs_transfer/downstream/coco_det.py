"""Detection on your own data in COCO JSON: the Faster R-CNN of pascal_det on the same FPN, COCO box AP.

Layout: under data.root the COCO 2017 layout, `annotations/instances_{train,val}2017.json` and `{train,val}2017/`,
or any other: task.train_json, task.val_json, task.train_images, task.val_images name the two JSON files and the
two image folders (relative to data.root, or absolute). A JSON's `file_name`s are relative to its image folder.

Reading the user's JSON (json, never eval): it must hold "images", "annotations" and "categories" lists with
unique integer ids; an annotation whose image_id or category_id is not listed, a bbox that is not 4 numbers, an
image file listed but missing and an image whose size is not the JSON's (its header read: tens of microseconds an
image, a few seconds for COCO train's 118k; tools/own_data_times.py) are DataErrors naming the JSON and the id, found
at build. Categories: the train
JSON's, sorted by id, are the labels 0..K-1 (COCO's ids 1..90 have gaps; exports keep any ids they like); the
val JSON must list the same ones. task.category_ids and task.class_names (None: from the data) are filled in at
build, so the run's config.yaml carries them and `predict`/`export` need no data; set, they must match the data.
Boxes are COCO's `[x, y, w, h]` floats in pixels; a box reaching past the border is clipped to the image, and a box
with w or h <= 0 or nothing inside the image is skipped, counted and logged with its annotation id. `iscrowd=1`
annotations are not training targets; evaluation matches them as COCO does (a detection on a crowd region is
neither a true nor a false positive). Images without annotations stay: negatives for training and evaluation.

Memory: a JSON is parsed once at build into per-image numpy arrays (boxes, labels, crowd flags, annotation ids,
areas: one row per annotation, `starts` marking each image's rows), not kept as per-annotation dicts.

Evaluation: detections of every rank gathered, then pycocotools' COCOeval against the val JSON's boxes (as read
above: original image and category ids), metrics `map` (AP@[.5:.95]), `ap50`, `ap75` and `ap/<category id>:<name>`;
with test-time augmentation (task.tta, detection.py's `detect_with_tta`) each name carries it: `map_flip`,
`ap_flip/...`. The model is detection.py's `Detector`, imported by the builders: importing this module imports no
torch, and `check_data` checks that the two JSON files and image folders exist before it is loaded.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np
from PIL import Image

from rs_transfer.config import ConfigError, data_root, record_inferred
from rs_transfer.data.text import ENCODING
from rs_transfer.downstream.config import FinetuneConfig, check_num_classes
from rs_transfer.downstream.data import read_image
from rs_transfer.downstream.pascal_det import DetectorSection, draw_detections
from rs_transfer.downstream.pascal_det import predict as predict_boxes
from rs_transfer.downstream.pascal_det import write_detections as write_boxes
from rs_transfer.downstream.protocol import Protocol
from rs_transfer.downstream.registry import TransferTaskDeclaration, metric_suffix
from rs_transfer.downstream.scenes import scene, visible_objects
from rs_transfer.errors import DataError
from rs_transfer.predictor import Predictor, visualizer
from rs_transfer.predictor import read_image as read_image_file

if TYPE_CHECKING:
    import torch

    from rs_transfer.downstream.detection import Detector
    from rs_transfer.engine.task import Task

log = logging.getLogger(__name__)

# pascal_det's protocol (Table 5's VOC detection column: batch 32, 896 crops, 5k-20k steps); not a paper column.
PROTOCOL = Protocol("map", (5000, 10000, 20000), 32, 896, "COCO-JSON det AP")
LAYOUT = ("the COCO layout (annotations/instances_train2017.json, train2017/, ...) or the files task.train_json, "
          "task.val_json, task.train_images, task.val_images name")


def _same_length(section, prefix: str) -> None:
    names, ids = section.class_names, section.category_ids
    if names is not None and ids is not None and len(names) != len(ids):
        raise ConfigError(f"{prefix}class_names has {len(names)} names and {prefix}category_ids {len(ids)} ids: "
                          "one name per category id")


@dataclass
class CocoDetSection(DetectorSection):
    RELATIONS = DetectorSection.RELATIONS + (_same_length,)

    name: str = "coco_det"
    train_json: str = "annotations/instances_train2017.json"  # relative to data.root, or absolute
    val_json: str = "annotations/instances_val2017.json"
    train_images: str = "train2017"  # the folder train_json's file_names are relative to
    val_images: str = "val2017"
    # None: from the train JSON's categories, sorted by id (filled in at build; set, they must match the data)
    class_names: Optional[list] = None
    category_ids: Optional[list] = None


@dataclass
class CocoDetConfig(FinetuneConfig):
    task: CocoDetSection = field(default_factory=CocoDetSection)


@dataclass
class CocoSplit:
    """One COCO JSON as arrays: N images, M annotations grouped by image (image i's rows are starts[i]:starts[i+1]),
    the degenerate ones already skipped."""

    json_path: Path
    image_dir: Path
    category_ids: list  # sorted; label k is category_ids[k]
    class_names: list  # the categories' names, in category_ids' order
    image_ids: np.ndarray  # (N,) int64
    files: np.ndarray  # (N,) str, relative to image_dir
    sizes: np.ndarray  # (N, 2) int64 height, width in pixels, as the JSON says
    starts: np.ndarray  # (N + 1,) int64
    boxes: np.ndarray  # (M, 4) float64 x0 y0 x1 y1, clipped to the image
    labels: np.ndarray  # (M,) int64 in 0..K-1
    crowd: np.ndarray  # (M,) bool: iscrowd=1
    annotation_ids: np.ndarray  # (M,) int64
    areas: np.ndarray  # (M,) float64: the JSON's area (COCO: the mask's), else the box's

    def ground_truth(self) -> dict:
        """The COCO instances dict that COCOeval compares with (original image and category ids, xywh boxes)."""
        owners = np.repeat(self.image_ids, np.diff(self.starts))
        annotations = [
            {"id": int(a), "image_id": int(i), "category_id": self.category_ids[label],
             "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float(area), "iscrowd": int(crowd)}
            for a, i, label, (x0, y0, x1, y1), area, crowd in zip(
                self.annotation_ids, owners, self.labels.tolist(), self.boxes.tolist(), self.areas, self.crowd)
        ]
        images = [{"id": int(i), "height": int(h), "width": int(w)} for i, (h, w) in zip(self.image_ids, self.sizes)]
        categories = [{"id": c, "name": n} for c, n in zip(self.category_ids, self.class_names)]
        return {"images": images, "categories": categories, "annotations": annotations}


def require_json(path: Path) -> None:
    """Raises DataError naming `path` when it is not a file (the JSON is not read)."""
    if not path.is_file():
        raise DataError(f"missing {path}: expected a COCO instances JSON (images, annotations, categories)")


def require_image_dir(image_dir: Path, path: Path) -> None:
    """Raises DataError naming `image_dir` when it is not a folder (the images that the JSON at `path` lists)."""
    if not image_dir.is_dir():
        raise DataError(f"missing image folder {image_dir}: expected the images that {path} lists")


def read_json(path: Path) -> dict:
    """The COCO instances file at `path` (json.load: data only). Raises DataError naming it when it is missing, not
    JSON, or lacks the "images", "annotations" or "categories" list."""
    require_json(path)
    try:
        with open(path, encoding=ENCODING) as file:
            data = json.load(file)
    except UnicodeDecodeError as error:
        raise DataError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start}): "
                        "expected a COCO JSON") from None
    except json.JSONDecodeError as error:
        raise DataError(f"{path} is not valid JSON ({error.msg} at line {error.lineno}, "
                        f"column {error.colno})") from None
    except (ValueError, RecursionError) as error:  # an integer of over 4300 digits; arrays nested thousands deep
        raise DataError(f"{path} is not a COCO JSON this toolkit can read ({type(error).__name__}: "
                        f"{'nested too deeply' if isinstance(error, RecursionError) else error})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path} holds a JSON {type(data).__name__}: expected a COCO instances object "
                        "{\"images\": [...], \"annotations\": [...], \"categories\": [...]}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{path} has no \"{key}\" list: expected a COCO instances JSON with images, annotations "
                            "and categories")
    return data


def _record(item, path: Path, what: str, position: int) -> dict:
    if not isinstance(item, dict):
        raise DataError(f"{path}: {what} #{position} is a JSON {type(item).__name__}, not an object")
    return item


def _integer(record: dict, key: str, path: Path, what: str) -> int:
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise DataError(f"{path}: {what} has {key} {value!r}: expected an integer")
    return value


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_categories(data: dict, path: Path) -> tuple:
    """(category ids sorted, their names) of a COCO JSON. Raises DataError for no categories, a duplicate id, or a
    category without an integer id and a string name."""
    names = {}
    for position, category in enumerate(data["categories"]):
        category = _record(category, path, "category", position)
        category_id = _integer(category, "id", path, f"category #{position}")
        if not isinstance(category.get("name"), str):
            raise DataError(f"{path}: category {category_id} has name {category.get('name')!r}: expected a string")
        if category_id in names:
            raise DataError(f"{path}: category id {category_id} is listed twice ({names[category_id]!r}, "
                            f"{category['name']!r}): ids must be unique")
        names[category_id] = category["name"]
    if not names:
        raise DataError(f"{path} lists no categories: expected at least one in \"categories\"")
    ids = sorted(names)
    return ids, [names[i] for i in ids]


def _read_images(data: dict, path: Path) -> tuple:
    """(ids (N,), file names (N,), sizes (N, 2) height width) of the "images" list."""
    ids, files, sizes = [], [], []
    for position, image in enumerate(data["images"]):
        image = _record(image, path, "image", position)
        image_id = _integer(image, "id", path, f"image #{position}")
        what = f"image {image_id}"
        if not isinstance(image.get("file_name"), str) or not image["file_name"]:
            raise DataError(f"{path}: {what} has file_name {image.get('file_name')!r}: expected a file name")
        size = [image.get("height"), image.get("width")]
        if not all(_number(v) and v > 0 and float(v).is_integer() for v in size):
            raise DataError(f"{path}: {what} ({image['file_name']}) has height {size[0]!r}, width {size[1]!r}: "
                            "expected positive whole numbers of pixels")
        ids.append(image_id)
        files.append(image["file_name"])
        sizes.append([int(v) for v in size])
    image_ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if len(np.unique(image_ids)) != len(image_ids):
        values, counts = np.unique(image_ids, return_counts=True)
        raise DataError(f"{path}: image id {int(values[counts > 1][0])} is listed twice: ids must be unique")
    return image_ids, np.asarray(files, dtype=str), np.asarray(sizes, dtype=np.int64).reshape(-1, 2)


def _clipped_box(annotation: dict, path: Path, what: str, height: int, width: int):
    """(x0, y0, x1, y1) of the annotation's [x, y, w, h] clipped to the image, or None when it has no area inside
    it. Raises DataError for a bbox that is not 4 finite numbers."""
    bbox = annotation.get("bbox")
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(_number(v) for v in bbox):
        raise DataError(f"{path}: {what} has bbox {bbox!r}: expected [x, y, width, height], 4 finite numbers")
    x, y, w, h = (float(v) for v in bbox)
    x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + w, float(width)), min(y + h, float(height))
    return (x0, y0, x1, y1) if w > 0 and h > 0 and x1 > x0 and y1 > y0 else None


def _read_annotations(data: dict, path: Path, image_ids: np.ndarray, sizes: np.ndarray, category_ids: list) -> tuple:
    """The annotations as arrays sorted by image (JSON order within one), with `starts`, and the skipped ids."""
    index_of = {int(image_id): i for i, image_id in enumerate(image_ids)}
    label_of = {category_id: k for k, category_id in enumerate(category_ids)}
    owners, boxes, labels, crowd, ids, areas, skipped, seen = [], [], [], [], [], [], [], set()
    for position, annotation in enumerate(data["annotations"]):
        annotation = _record(annotation, path, "annotation", position)
        annotation_id = _integer(annotation, "id", path, f"annotation #{position}")
        what = f"annotation {annotation_id}"
        if annotation_id in seen:
            raise DataError(f"{path}: annotation id {annotation_id} is listed twice: ids must be unique")
        seen.add(annotation_id)
        image_id = _integer(annotation, "image_id", path, what)
        if image_id not in index_of:
            raise DataError(f"{path}: {what} has image_id {image_id}, which is not in \"images\"")
        category_id = _integer(annotation, "category_id", path, what)
        if category_id not in label_of:
            raise DataError(f"{path}: {what} has category_id {category_id}, which is not in \"categories\" "
                            f"(ids {category_ids})")
        iscrowd = annotation.get("iscrowd", 0)
        if iscrowd not in (0, 1):  # False and True are 0 and 1
            raise DataError(f"{path}: {what} has iscrowd {iscrowd!r}: expected 0 or 1")
        image = index_of[image_id]
        box = _clipped_box(annotation, path, what, *sizes[image])
        if box is None:
            skipped.append(annotation_id)
            continue
        area = annotation.get("area")
        owners.append(image)
        boxes.append(box)
        labels.append(label_of[category_id])
        crowd.append(bool(iscrowd))
        ids.append(annotation_id)
        areas.append(float(area) if _number(area) and area > 0 else (box[2] - box[0]) * (box[3] - box[1]))
    order = np.argsort(np.asarray(owners, dtype=np.int64), kind="stable")
    starts = np.concatenate([[0], np.cumsum(np.bincount(np.asarray(owners, dtype=np.int64), minlength=len(image_ids)))])
    arrays = (np.asarray(boxes, dtype=np.float64).reshape(-1, 4), np.asarray(labels, dtype=np.int64),
              np.asarray(crowd, dtype=bool), np.asarray(ids, dtype=np.int64), np.asarray(areas, dtype=np.float64))
    return (starts.astype(np.int64), *(a[order] for a in arrays)), skipped


EXIF_ORIENTATION = 0x0112  # values 5-8 turn the picture a quarter; viewers and annotation tools show it turned


def _check_image_files(image_dir: Path, files: np.ndarray, image_ids: np.ndarray, sizes: np.ndarray,
                       path: Path) -> None:
    """Every listed image is there and its size (read from its header, no decoding) is the JSON's: a size that
    differs would misplace its boxes, and found at build it costs seconds, not a run stopped hours in. Raises
    DataError naming the first file (and, for a picture that its EXIF orientation turns, saying so)."""
    require_image_dir(image_dir, path)
    missing = [i for i, name in enumerate(files) if not (image_dir / name).is_file()]
    if missing:
        first = missing[0]
        raise DataError(f"{len(missing)} of {len(files)} images that {path} lists are missing; the first: "
                        f"{image_dir / files[first]} (image id {image_ids[first]})")
    for index, name in enumerate(files):
        try:
            with Image.open(image_dir / name) as image:
                width, height = image.size
                orientation = image.getexif().get(EXIF_ORIENTATION, 1)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            continue  # not an image: the reader names it when it reads it
        if (height, width) == tuple(sizes[index]):
            continue
        turned = (" Its EXIF orientation tag turns it a quarter, and the annotation tool drew the boxes on the turned "
                  "picture: save the image turned (PIL.ImageOps.exif_transpose) so its pixels are what was annotated"
                  if orientation in (5, 6, 7, 8) and (width, height) == tuple(sizes[index]) else "")
        raise DataError(f"{image_dir / name} is {width}x{height} pixels, but {path} says {sizes[index][1]}x"
                        f"{sizes[index][0]} (image id {image_ids[index]}): its boxes would be misplaced.{turned}")


def load_split(json_path: Path, image_dir: Path, expected: tuple | None = None) -> CocoSplit:
    """The COCO JSON at `json_path` as a CocoSplit, every listed image file checked to exist under `image_dir`.
    `expected`: (category ids, names) the JSON must list (the val JSON lists the train JSON's categories).

    Raises DataError naming the JSON for a malformed file (see the module's docstring), other categories than
    `expected`, or a missing image file (naming it). Degenerate boxes are skipped and logged with their ids."""
    data = read_json(json_path)
    category_ids, class_names = read_categories(data, json_path)
    if expected is not None and (category_ids, class_names) != tuple(expected):
        raise DataError(f"{json_path} lists the categories {dict(zip(category_ids, class_names))}, the training JSON "
                        f"{dict(zip(*expected))}: both JSON files must list the same categories (ids and names)")
    image_ids, files, sizes = _read_images(data, json_path)
    if not len(image_ids):
        raise DataError(f"{json_path} lists no images: expected at least one in \"images\"")
    (starts, boxes, labels, crowd, ids, areas), skipped = _read_annotations(data, json_path, image_ids, sizes,
                                                                            category_ids)
    del data  # the parsed JSON (COCO train: several GB of dicts) goes before the files are checked
    if skipped:
        log.warning("%s: skipped %d annotation%s whose box has no area inside its image (w or h <= 0, or outside "
                    "the image); annotation ids: %s", json_path, len(skipped), "s" if len(skipped) > 1 else "",
                    ", ".join(map(str, skipped[:20])) + (", ..." if len(skipped) > 20 else ""))
    _check_image_files(image_dir, files, image_ids, sizes, json_path)
    return CocoSplit(json_path=json_path, image_dir=image_dir, category_ids=category_ids, class_names=class_names,
                     image_ids=image_ids, files=files, sizes=sizes, starts=starts, boxes=boxes, labels=labels,
                     crowd=crowd, annotation_ids=ids, areas=areas)


# No torch Dataset base, so that importing this module imports no torch: a map-style dataset is any object with
# __getitem__ and __len__ (torch.utils.data's docs), which DataLoader, Subset and the engine accept.
class CocoDetection:
    """{"image": uint8 3xHxW, "boxes": BoundingBoxes XYXY (non-crowd), "labels" (0..K-1), "id": the image id} after
    `transform`."""

    def __init__(self, split: CocoSplit, transform=None):
        self.split = split
        self.transform = transform

    def __len__(self):
        return len(self.split.image_ids)

    def __getitem__(self, index):
        import torch
        from torchvision import tv_tensors

        split = self.split
        path = split.image_dir / split.files[index]
        image = read_image(path)
        if tuple(image.shape[-2:]) != tuple(split.sizes[index]):
            height, width = split.sizes[index]
            raise DataError(f"{path} is {image.shape[-1]}x{image.shape[-2]} pixels, but {split.json_path} says "
                            f"{width}x{height} (image id {split.image_ids[index]}): its boxes would be misplaced")
        rows = slice(split.starts[index], split.starts[index + 1])
        targets = ~split.crowd[rows]  # crowd regions are not training targets
        sample = {
            "image": image,
            "boxes": tv_tensors.BoundingBoxes(torch.from_numpy(split.boxes[rows][targets].astype(np.float32)),
                                              format="XYXY", canvas_size=tuple(image.shape[-2:])),
            "labels": torch.from_numpy(split.labels[rows][targets]),
            "id": int(split.image_ids[index]),
        }
        return self.transform(sample) if self.transform else sample


def _eval_collate(samples: list) -> dict:
    import torch

    return {"images": [s["image"].as_subclass(torch.Tensor) for s in samples], "ids": [s["id"] for s in samples]}


def make_evaluator(val: CocoSplit, batch_size: int, num_workers: int = 0, tta: str = "none"):
    """COCO box AP of `model(batch)` (eval mode: torchvision detections, one dict per image with "boxes" (K, 4) x1 y1
    x2 y2 in input pixels, "labels" (K,) 1..K, "scores" (K,)) over `val`'s images, each rank a contiguous part,
    detections gathered to every rank, then pycocotools' COCOeval on every rank (the same numbers):
    {"map", "ap50", "ap75", "ap/<category id>:<name>"} as fractions; categories without a non-crowd box in `val`
    are not listed; each name carries the model's test-time augmentation `tta` (task.tta: "map_flip", "ap_flip/...").
    Raises DataError naming `val`'s JSON when it has no non-crowd box (here, before any training)."""
    import torch

    from rs_transfer.downstream.metrics import coco_box_ap
    from rs_transfer.engine.device import model_device, to_device
    from rs_transfer.engine.distributed import all_gather_list
    from rs_transfer.engine.loader import eval_batches

    if not (~val.crowd).any():
        raise DataError(f"{val.json_path} has no box to evaluate on (none that is not iscrowd and has an area inside "
                        "its image): COCO AP would be undefined; give a val JSON with annotated objects")
    dataset = CocoDetection(val)

    def evaluate(model) -> dict:
        device = model_device(model)
        found = []
        with torch.no_grad():
            for batch in eval_batches(dataset, batch_size, _eval_collate, num_workers, device):
                outputs = model(to_device({"images": batch["images"]}, device))
                for image_id, out in zip(batch["ids"], outputs):
                    for (x0, y0, x1, y1), label, score in zip(out["boxes"].float().cpu().tolist(),
                                                              out["labels"].cpu().tolist(),
                                                              out["scores"].float().cpu().tolist()):
                        found.append((image_id, val.category_ids[label - 1], score, x0, y0, x1 - x0, y1 - y0))
        detections = [{"image_id": image_id, "category_id": category_id, "score": score, "bbox": [x, y, w, h]}
                      for image_id, category_id, score, x, y, w, h in all_gather_list(found)]
        result = coco_box_ap(val.ground_truth(), detections)
        suffix = metric_suffix(tta=tta)
        metrics = {key + suffix: result[key] for key in ("map", "ap50", "ap75")}
        for category_id, name in zip(val.category_ids, val.class_names):
            if result["per_category"][category_id] is not None:
                metrics[f"ap{suffix}/{category_id}:{name}"] = result["per_category"][category_id]
        return metrics

    return evaluate


def set_categories(config, split: CocoSplit) -> None:
    """Fill task.category_ids, task.class_names and model.num_classes from the train JSON. Raises ConfigError when
    one of them is set to something else (naming both)."""
    task_cfg = config.task
    for key, found in (("category_ids", split.category_ids), ("class_names", split.class_names)):
        given = getattr(task_cfg, key)
        if given is not None and list(given) != list(found):
            raise ConfigError(f"task.{key}={list(given)}, but {split.json_path} lists {list(found)} (its categories "
                              f"sorted by id): leave task.{key} unset to take it from the data, or fix one of the two")
        record_inferred(config, f"task.{key}", list(found))
    check_num_classes(config, len(split.category_ids))


def build_model(config) -> Detector:
    """pascal_det's Faster R-CNN with one class per task.category_ids (eval mode: detections per image, labels 1..K,
    see make_evaluator), no data read. Raises ConfigError when task.category_ids is unset (build fills it in from
    the data) or model.num_classes disagrees, WeightsError for model.weights that do not fit."""
    from rs_transfer.downstream.detection import detector

    category_ids = config.task.category_ids
    if category_ids is None:
        raise ConfigError("task.category_ids is not set: coco_det takes its categories from the train JSON when it "
                          "builds the task (a run's config.yaml then carries them)")
    check_num_classes(config, len(category_ids))
    return detector(config, len(category_ids))


def build(config) -> Task:
    """The coco_det Task: task.train_json + task.train_images to task.val_json + task.val_images under data.root,
    pascal_det's Faster R-CNN on our FPN P3-P7 with one class per category (eval mode: detections per image), COCO
    box AP (`map`). Fills task.category_ids, task.class_names and model.num_classes from the train JSON.
    Raises ConfigError for an unset data.root or classes set in the config that the data contradicts, DataError
    for a malformed JSON or a missing file (naming it)."""
    from rs_transfer.downstream.detection import det_collate, train_transform
    from rs_transfer.engine.task import Task

    task_cfg = config.task
    root = data_root(config.data.root, LAYOUT)
    train = load_split(root / task_cfg.train_json, root / task_cfg.train_images)
    set_categories(config, train)
    val = load_split(root / task_cfg.val_json, root / task_cfg.val_images, (train.category_ids, train.class_names))
    train_set = CocoDetection(train, train_transform(task_cfg.crop_size, (task_cfg.scale_min, task_cfg.scale_max),
                                                     labels_getter="default"))
    return Task(model=build_model(config), train_set=train_set,
                evaluate=make_evaluator(val, task_cfg.eval_batch_size, config.data.num_workers, task_cfg.tta),
                primary_metric=PROTOCOL.metric + metric_suffix(tta=task_cfg.tta), collate_fn=det_collate,
                visualize=visualizer(CocoDetection(val), PREDICTOR, config))


def check_data(config) -> None:
    """The files `build` reads, without torch and without reading a JSON: task.train_json, task.train_images,
    task.val_json and task.val_images under data.root (parsing the JSON and checking every image it lists is
    `build`'s: seconds for COCO train). Raises ConfigError for an unset data.root, DataError naming the first
    missing file or folder (as `build` does)."""
    task_cfg = config.task
    root = data_root(config.data.root, LAYOUT)
    for json_path, image_dir in ((task_cfg.train_json, task_cfg.train_images),
                                 (task_cfg.val_json, task_cfg.val_images)):
        require_json(root / json_path)
        require_image_dir(root / image_dir, root / json_path)


def predict(model, config, image: torch.Tensor) -> dict:
    """uint8 (3, H, W) -> pascal_det's detections of the image ("boxes" (K, 4) x1 y1 x2 y2 in the image's pixels,
    "labels" (K,) 1..K, "scores" (K,)) plus "category_ids" (K,), the JSON's ids of the labels, on the CPU."""
    import torch

    detections = predict_boxes(model, config, image)
    detections["category_ids"] = torch.tensor(config.task.category_ids, dtype=torch.int64)[detections["labels"] - 1]
    return detections


def write_detections(out, name: str, image: torch.Tensor, detections: dict, class_names) -> dict:
    """pascal_det's record and boxes/<name>.png, each detection also with its "category_id" (the JSON's id)."""
    record = write_boxes(out, name, image, detections, class_names)
    record["detections"] = [{"class": d["class"], "category_id": category_id, **d}
                            for d, category_id in zip(record["detections"], detections["category_ids"].tolist())]
    return record


SYNTHETIC_CATEGORIES = ((42, "blue"), (3, "red"), (7, "green"))  # (id, name), listed unsorted, as exports may
COLOURS_OF = {3: 0, 7: 1, 42: 2}  # category id -> its colour in scenes.COLOURS (red, green, blue)


def _rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE of a bool mask: lengths of alternating runs in column-major order, zeros first."""
    flat = mask.flatten(order="F").astype(np.int8)
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    runs = np.diff(bounds).tolist()
    return {"counts": [0] + runs if flat[0] else runs, "size": list(mask.shape)}


def write_coco_det(root, train=48, val=12, size=(96, 128), seed=0) -> Path:
    """The COCO 2017 layout: annotations/instances_{train,val}2017.json and {train,val}2017/*.jpg, with what real
    exports hold: category ids 3, 7, 42 (listed unsorted), image ids with gaps, images of two shapes, float
    [x, y, w, h] boxes. In each split image 0 has no annotation, the first image with two or more objects has its
    top one as an iscrowd=1 region (an RLE mask), and image 2 has one more annotation with a degenerate box (w = 0)."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    categories = [{"id": i, "name": name, "supercategory": "shape"} for i, name in SYNTHETIC_CATEGORIES]
    ids_of = {colour: category_id for category_id, colour in COLOURS_OF.items()}
    annotation_id = 0
    for split, count in (("train2017", train), ("val2017", val)):
        (root / split).mkdir(exist_ok=True)
        images, annotations, crowd_done = [], [], False
        for i in range(count):
            height, width = size if i % 2 == 0 else size[::-1]
            objects = 0 if i == 0 else 3
            image, _, drawn = scene(rng, height, width, len(COLOURS_OF), min_objects=min(objects, 1),
                                    max_objects=objects)
            image_id = 9 * i + 5
            images.append({"id": image_id, "file_name": f"{image_id:012d}.jpg", "height": height, "width": width})
            Image.fromarray(image).save(root / split / f"{image_id:012d}.jpg", quality=95)
            visible = visible_objects(drawn, (height, width))
            for n, (k, (x0, y0, x1, y1), mask) in enumerate(visible):
                annotation_id += 1
                crowd = n == 0 and len(visible) > 1 and not crowd_done
                crowd_done |= crowd
                annotations.append({
                    "id": annotation_id, "image_id": image_id, "category_id": ids_of[k], "iscrowd": int(crowd),
                    "bbox": [x0 + 0.25, y0 + 0.5, x1 - x0 - 0.5, y1 - y0 - 0.75], "area": float(mask.sum()),
                    "segmentation": _rle(mask) if crowd else [[x0, y0, x1, y0, x1, y1, x0, y1]],
                })
            if i == 2:
                annotation_id += 1
                annotations.append({"id": annotation_id, "image_id": image_id, "category_id": 3, "iscrowd": 0,
                                    "bbox": [10.0, 12.5, 0.0, 20.0], "area": 0.0, "segmentation": []})
        document = {"info": {"description": "rs-transfer synthetic COCO"}, "licenses": [], "images": images,
                    "annotations": annotations, "categories": categories}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(document), encoding="utf-8")
    return root


def write_synthetic(root, train: int, val: int):
    return write_coco_det(root, train=train, val=val)


PREDICTOR = Predictor(read=read_image_file, predict=predict, write=write_detections,
                      class_names=lambda config: (config.task.class_names, "the train JSON's categories sorted by id "
                                                  "(task.class_names, task.category_ids of the run's config.yaml)"),
                      draw=draw_detections)

TASK = TransferTaskDeclaration(
    name="coco_det", config=CocoDetConfig, build=build, protocol=PROTOCOL, write_synthetic=write_synthetic,
    build_model=build_model, predictor=PREDICTOR, check_data=check_data, paper={},
)
