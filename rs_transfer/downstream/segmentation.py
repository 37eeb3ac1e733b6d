"""Semantic segmentation, shared by the tasks pascal_seg (Pascal VOC 2012, 21 classes, optional SBD trainaug;
rs_transfer/downstream/pascal_seg.py) and ade_seg (ADE20K, 150 classes; ade_seg.py): readers, model, evaluator.

Layouts (data.root is the folder as distributed):
  VOC: data.root holds VOC2012/ or VOCdevkit/VOC2012/ (or is VOC2012/): JPEGImages/<id>.jpg,
       SegmentationClass/<id>.png (palette PNG, index = class, 255 = ignore/boundary), ImageSets/Segmentation/
       {train,val}.txt. trainaug: task.sbd_root holds SBD's dataset/cls/<id>.mat (GTcls.Segmentation),
       dataset/{train,val}.txt; trainaug = SBD train + SBD val + VOC train - VOC val (10,582 images).
  ADE: data.root holds ADEChallengeData2016/ (or is it): images/{training,validation}/*.jpg,
       annotations/{training,validation}/*.png (greyscale, 0 = other/ignore, 1..150 = classes; shifted to 0..149).
"""

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset
from torchvision import tv_tensors

from rs_transfer.downstream.config import arch_args, check_num_classes
from rs_transfer.downstream.data import (
    IGNORE, dense_train_transform, find_dir, pad_collate, read_image, read_label_png, read_split, require,
)
from rs_transfer.downstream.fpn import DensePredictor
from rs_transfer.downstream.metrics import MeanIoU
from rs_transfer.downstream.scenes import voc_palette
from rs_transfer.engine.device import model_device, to_device
from rs_transfer.engine.loader import eval_loader
from rs_transfer.engine.task import Task
from rs_transfer.errors import DataError
from rs_transfer.predict import Predictor, output_path, overlay_classes, palette_png, save_png, save_rgb, visualizer
from rs_transfer.predict import read_image as read_image_file

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
ADE_NUM_CLASSES = 150
# ADE20K's SceneParsing class names (objectInfo150), in training index order (raw label - 1), as mmsegmentation.
ADE_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet", "sidewalk",
    "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water", "painting", "sofa",
    "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe",
    "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter",
    "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case",
    "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind", "coffee table",
    "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm", "kitchen island", "computer",
    "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower",
    "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane", "dirt track", "apparel",
    "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship",
    "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel", "basket",
    "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name",
    "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood",
    "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)
FILLS = {"image": 0, "mask": IGNORE}
METRIC = "miou"


def seg_collate(samples: list) -> dict:
    batch = pad_collate(samples, FILLS)
    batch["mask"] = batch["mask"].long()
    return batch


class SegmentationSet(Dataset):
    """items: [(image path, (label path, label reader))]; returns {"image": uint8 3xHxW, "mask": uint8 HxW}
    after `transform`. Readers are module-level functions so the set pickles into loader workers."""

    def __init__(self, items: list, num_classes: int, transform=None):
        self.items = items
        self.num_classes = num_classes
        self.transform = transform

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
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


def voc_dir(root):
    return find_dir(root, ("VOC2012", "VOCdevkit/VOC2012", "."), "Pascal VOC 2012 (a VOC2012 folder)")


def read_sbd_mat(path) -> np.ndarray:
    """Class indices (uint8 HxW) of an SBD cls/<id>.mat: the 1x1 struct GTcls, field Segmentation.

    Read without squeezing: squeeze_me would turn a label one pixel wide or high into a vector. Raises
    DataError naming `path` when the struct or field is missing or the label is not 2-D class indices."""
    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError

    try:
        gt = loadmat(require(path, "an SBD label .mat"), struct_as_record=False)["GTcls"]
        label = np.asarray(gt[0, 0].Segmentation)
    except (MatReadError, KeyError, AttributeError, IndexError, TypeError, ValueError) as error:
        raise DataError(f"SBD label {path} has no GTcls.Segmentation: {type(error).__name__}: {error}") from None
    numeric = label.ndim == 2 and label.dtype.kind in "uif"
    if not numeric or not np.all((label % 1 == 0) & (label >= 0) & (label <= 255)):
        raise DataError(f"SBD label {path}: GTcls.Segmentation is {label.dtype} {label.shape}: expected a 2-D "
                           "array of class indices 0..255")
    return label.astype(np.uint8)


def voc_items(root, split: str, sbd_root=None) -> list:
    """[(image path, (label path, loader))] for a VOC split; "trainaug" merges SBD."""
    voc = voc_dir(root)
    sets = voc / "ImageSets" / "Segmentation"
    expected = "one image id per line (VOC2012 ImageSets/Segmentation)"
    jpeg = voc / "JPEGImages"
    require(jpeg, "VOC2012/JPEGImages/<id>.jpg")
    require(voc / "SegmentationClass", "VOC2012/SegmentationClass/<id>.png (palette PNGs)")
    if split != "trainaug":
        ids = read_split(sets / f"{split}.txt", expected)
        return [(jpeg / f"{i}.jpg", (voc / "SegmentationClass" / f"{i}.png", read_label_png)) for i in ids]
    if sbd_root is None:
        raise DataError("task.train_split=trainaug needs task.sbd_root=DIR (SBD's benchmark_RELEASE folder)")
    sbd = find_dir(sbd_root, ("dataset", "benchmark_RELEASE/dataset"), "SBD (a dataset folder with cls/ and train.txt)")
    sbd_ids = read_split(sbd / "train.txt", "SBD train ids") + read_split(sbd / "val.txt", "SBD val ids")
    voc_train = read_split(sets / "train.txt", expected)
    val = set(read_split(sets / "val.txt", expected))
    items, seen = [], set()
    for i in voc_train + sbd_ids:
        if i in val or i in seen:
            continue
        seen.add(i)
        png = voc / "SegmentationClass" / f"{i}.png"
        label = (png, read_label_png) if png.exists() else (sbd / "cls" / f"{i}.mat", read_sbd_mat)
        image = jpeg / f"{i}.jpg"
        items.append((image if image.exists() else sbd / "img" / f"{i}.jpg", label))
    return items


def ade_items(root, split: str) -> list:
    ade = find_dir(root, ("ADEChallengeData2016", "."), "ADE20K (an ADEChallengeData2016 folder)")
    folder = {"train": "training", "val": "validation"}.get(split, split)
    images = require(ade / "images" / folder, f"ADEChallengeData2016/images/{folder}/*.jpg")
    annotations = require(ade / "annotations" / folder, f"ADEChallengeData2016/annotations/{folder}/*.png")
    paths = sorted(images.glob("*.jpg"))
    if not paths:
        raise DataError(f"no .jpg images in {images}")
    return [(p, (annotations / f"{p.stem}.png", read_ade_label)) for p in paths]


def read_ade_label(path) -> np.ndarray:
    # 0 ("other") -> 255 ignore, 1..150 -> 0..149: uint8 arithmetic wraps 0 - 1 to 255.
    return read_label_png(path) - np.uint8(1)


class SegmentationModel(nn.Module):
    """batch {"image", "mask"} -> {"loss"} in train mode; logits (N, classes, H, W) in eval mode."""

    def __init__(self, backbone: str, num_classes: int, weights=None, fpn_channels=256, head_channels=256, **arch):
        super().__init__()
        self.net = DensePredictor(backbone, num_classes, weights=weights, fpn_channels=fpn_channels,
                                  head_channels=head_channels, **arch)

    def forward(self, batch: dict):
        logits = self.net(batch["image"])
        if not self.training:
            return logits
        return {"loss": F.cross_entropy(logits, batch["mask"], ignore_index=IGNORE)}


def make_evaluator(val_set, num_classes: int, batch_size: int, num_workers: int = 0, class_names=None):
    """mIoU of `model(batch)` (eval mode: logits (N, classes, H, W) at the label's size) over `val_set`, each rank a
    contiguous part, confusion counts reduced over ranks (metrics.MeanIoU, torchmetrics' MulticlassJaccardIndex;
    label 255 ignored): {"miou", "iou/<class>"} as fractions. Raises DataError when every pixel is ignore."""
    def evaluate(model: nn.Module) -> dict:
        device = model_device(model)
        metric = MeanIoU(num_classes, device=device)
        with torch.no_grad():
            for batch in eval_loader(val_set, batch_size, seg_collate, num_workers, device):
                batch = to_device(batch, device)
                metric.update(model(batch).argmax(1), batch["mask"])
        return metric.compute(class_names)

    return evaluate


def build_model(config, num_classes: int) -> SegmentationModel:
    """The FPN segmentation model with `num_classes` outputs from model.* and task.* alone (no data read).
    Raises ConfigError for a model.num_classes other than `num_classes`, WeightsError for model.weights that do
    not fit."""
    task_cfg = config.task
    check_num_classes(config, num_classes)
    return SegmentationModel(config.model.name, num_classes, weights=config.model.weights,
                             fpn_channels=task_cfg.fpn_channels, head_channels=task_cfg.head_channels,
                             **arch_args(config))


def predict(model, config, image: torch.Tensor) -> torch.Tensor:
    """uint8 (3, H, W) -> class indices int64 (H, W), the model's (0..classes-1): the argmax of the logits of the
    whole image at its own size, as the evaluator computes them (no resize, no crop)."""
    logits = model({"image": image[None].to(model_device(model))})
    return logits[0].argmax(0).cpu()


def predictor(class_names: tuple, offset: int, background=None, source: str = "") -> Predictor:
    """`rs-transfer predict` for a segmentation task whose dataset stores class c as c + `offset` (ADE: 1, its 0 is
    "other"). Writes masks/<name>.png (a palette PNG of the dataset's indices, VOC's colours) and overlays/<name>.png
    (torchvision's draw_segmentation_masks; class `background`, a dataset index, left unpainted); the record lists
    the mask, the overlay and each class present with its share of the pixels."""
    palette = voc_palette()
    colours = {c: tuple(palette[3 * c: 3 * c + 3]) for c in range(len(palette) // 3)}

    def draw(image: torch.Tensor, classes: torch.Tensor, names) -> torch.Tensor:
        return overlay_classes(image, classes + offset, colours, skip=() if background is None else (background,))

    def write(out, name: str, image: torch.Tensor, classes: torch.Tensor, names) -> dict:
        raw = classes + offset
        mask = save_png(output_path(out, "masks", name, ".png"), palette_png(raw.numpy(), palette))
        overlay_path = save_rgb(output_path(out, "overlays", name, ".png"), draw(image, classes, names))
        values, counts = classes.unique(return_counts=True)
        present = [{"index": int(v) + offset, "class": names[int(v)], "fraction": int(n) / classes.numel()}
                   for v, n in zip(values.tolist(), counts.tolist())]
        return {"mask": mask.relative_to(out).as_posix(), "overlay": overlay_path.relative_to(out).as_posix(),
                "classes": present}

    return Predictor(read=read_image_file, predict=predict, write=write, class_names=lambda config: (class_names, source),
                     draw=draw)


def build_segmentation(config, train_items: list, val_items: list, num_classes: int, class_names=None,
                       predictor: Predictor | None = None) -> Task:
    """The shared part of pascal_seg and ade_seg (which differ only in their data): datasets from (image, label)
    items, the FPN segmentation model, the mIoU evaluator, and (with the task's `predictor`) the overlays of a few
    validation images sent to TensorBoard at every evaluation."""
    task_cfg = config.task
    check_num_classes(config, num_classes)
    transform = dense_train_transform(task_cfg.crop_size, (task_cfg.scale_min, task_cfg.scale_max),
                                      {tv_tensors.Image: 0, tv_tensors.Mask: IGNORE})
    train_set = SegmentationSet(train_items, num_classes, transform)
    val_set = SegmentationSet(val_items, num_classes)
    model = build_model(config, num_classes)
    evaluate = make_evaluator(val_set, num_classes, task_cfg.eval_batch_size, config.data.num_workers, class_names)
    visualize = visualizer(val_set, predictor, config) if predictor is not None else None
    return Task(model=model, train_set=train_set, evaluate=evaluate, primary_metric=METRIC, collate_fn=seg_collate,
                visualize=visualize)
