"""Classification on your own class folders: `data.root/train/<class>/*` and `data.root/val/<class>/*`
(torchvision's ImageFolder layout), with the paper's transfer protocol: the zoo classifier with a new linear head,
fine-tuned at `task.image_size` over the learning-rate grid. Not the pretraining recipe (no RandAugment, no label
smoothing, no EMA).

Classes are the folder names of train/, sorted (spaces and any unicode allowed), numbered in that order as
ImageFolder does; model.num_classes and task.class_names are filled in from them at build, so the run's config.yaml
carries them to `predict` and `export`. A class folder without an image keeps its index (warned: its output is
never taught); a class folder of val/ that train/ lacks is an error naming it.

Which files are images: every extension Pillow opens and decodes (data.folders.image_extensions, any case), at any
depth below a class folder; hidden files and folders are skipped, other files are counted in one log line. Images
of any PIL mode become 8-bit RGB (data/images.py).

Reading is pretraining's class-folder reader (pretrain/data.py ImageDataset, pretrain/transforms.py): an image that
cannot be decoded is skipped with a warning naming it and the next one stands in, as pretraining does; 16
unreadable in a row is an error. Training: RandomResizedCrop (area task.crop_min_area..1, aspect 3/4..4/3,
bicubic) and a horizontal flip; evaluation and predict: the centred square of 87.5% of the short side (224 of 256,
TF's crop) resized to task.image_size. Metrics: top1, top5 (with at least 5 classes), acc/<class> per class.

Importing this module imports no torch (the registry imports it to answer config and layout mistakes first):
pretrain/data.py, pretrain/shards.py (through wids), pretrain/transforms.py and the engine import torch at their
top, so the functions that use them import them where they run.
"""

from __future__ import annotations

import logging
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np
from PIL import Image

from rs_transfer.config import (ConfigError, MAX_PIXELS, at_least, at_most, checked, data_root, fraction,
                                record_inferred)
from rs_transfer.data.folders import check_sorted, class_folders, find_classes, image_extensions, list_files
from rs_transfer.downstream.config import FinetuneConfig, TaskSection, arch_args, check_num_classes
from rs_transfer.downstream.protocol import Protocol
from rs_transfer.downstream.registry import TransferTaskDeclaration
from rs_transfer.downstream.scenes import COLOURS, background
from rs_transfer.errors import DataError
from rs_transfer.predictor import Predictor, read_image, write_top5

if TYPE_CHECKING:
    import torch

    from rs_transfer.engine.classification import Classifier
    from rs_transfer.engine.task import Task

log = logging.getLogger(__name__)

LAYOUT = "train/<class>/<images> and val/<class>/<images>"
# The paper's classification transfer (Table 5's CIFAR-100 column): batch 512, 5k/10k/20k steps. Not in Table 5.
PROTOCOL = Protocol("top1", (5000, 10000, 20000), 512, None, "folder cls", image_size=224)


@dataclass
class FolderClsSection(TaskSection):
    name: str = "folder_cls"
    image_size: int = checked(224, at_least(1), at_most(MAX_PIXELS))  # training crop and evaluation size, pixels (square)
    crop_min_area: float = checked(0.08, fraction(closed_high=True, open_low=True))  # RandomResizedCrop's smallest area
    class_names: Optional[list[str]] = None  # None: the sorted class folders of train/ (filled in); set: must match


@dataclass
class FolderClsConfig(FinetuneConfig):
    task: FolderClsSection = field(default_factory=FolderClsSection)


def split_dir(root, split: str) -> Path:
    """data.root/split. Raises ConfigError when data.root is unset, DataError naming the folder when it is missing."""
    path = data_root(root, LAYOUT) / split
    if not path.is_dir():
        raise DataError(f"missing {path}: expected {path}/<class>/<images>, one folder per class "
                        f"(data.root holds {LAYOUT})")
    return path


def find_layout(root) -> tuple:
    """(train folder, val folder, classes: the sorted class folders of train/) of data.root, from folder names
    alone (no image is listed). Raises ConfigError when data.root is unset, DataError naming a missing split, a split
    without class folders, or a train/ with fewer than two."""
    train, val = split_dir(root, "train"), split_dir(root, "val")
    classes = find_classes(train, image_extensions())  # every format Pillow decodes
    find_classes(val, image_extensions())  # a val/ of loose images and no class folder: named so, not "no image"
    if len(classes) < 2:
        raise DataError(f"{train} has one class folder ({classes[0]!r}): classification needs at least two")
    return train, val, classes


def check_data(config) -> None:
    """TransferTaskDeclaration.check_data: data.root has train/ and val/ with class folders (`find_layout`; the images
    are listed by `build`). Raises ConfigError for an unset data.root, DataError naming what is missing."""
    find_layout(config.data.root)


def list_split(folder: Path, classes: list) -> list:
    """Every image below folder/<class>/, labelled by the class's index in `classes`, in sorted order, as pretrain's
    Items (ref = the path, for warnings). Files that are not images are counted in one log line.

    Raises DataError naming a class folder whose class `classes` lacks (a class of val/ that train/ does not have),
    and a split without any image."""
    from rs_transfer.pretrain.data import Item
    from rs_transfer.pretrain.shards import first_names

    index = {name: i for i, name in enumerate(classes)}
    items, ignored = [], []
    for name in class_folders(folder):
        if name not in index:
            raise DataError(f"{folder / name}: class {name!r} of {folder.name}/ is not a class folder of train/ "
                            f"(classes come from {folder.parent / 'train'}): add its training images, or remove it")
        images, others = list_files(folder / name, image_extensions(), skip_hidden=True)
        items += [Item(str(path), index[name], str(path)) for path in images]
        ignored += others
    check_sorted(folder, image_extensions(), len(items))
    if ignored:
        log.info("%s: %d files in class folders are not images Pillow reads and are ignored: %s", folder,
                 len(ignored), first_names([str(p.relative_to(folder)) for p in ignored]))
    if not items:
        raise DataError(f"{folder} holds no image in its class folders (any format Pillow reads: .jpg, .png, .webp, "
                        f".tif, ... in any case)")
    return items


def _unused_classes(items: list, classes: list) -> list:
    seen = {item.label for item in items}
    return [name for i, name in enumerate(classes) if i not in seen]


def set_class_names(config, classes: list, train: Path) -> None:
    """Fill task.class_names with the class folders (None), or check the names the config gives against them (in
    Unicode NFC: macOS writes folder names decomposed). Raises ConfigError naming both when they differ."""
    from rs_transfer.pretrain.shards import first_names

    given = config.task.class_names
    if given is not None:
        def nfc(names):
            return [unicodedata.normalize("NFC", str(name)) for name in names]

        if nfc(given) != nfc(classes):
            only_config = [n for n in nfc(given) if n not in nfc(classes)]
            only_data = [n for n in nfc(classes) if n not in nfc(given)]
            detail = (f"only in task.class_names: {first_names(only_config) or '-'}; only in the folders: "
                      f"{first_names(only_data) or '-'}" if only_config or only_data else
                      "the same names in another order, but classes are numbered in sorted folder order")
            raise ConfigError(f"task.class_names ({len(given)} names) disagrees with the {len(classes)} class folders "
                              f"of {train}: {detail}; leave task.class_names unset (null) to take the folders")
    record_inferred(config, "task.class_names", list(classes))


def build_datasets(config) -> tuple:
    """(train items, val items) of data.root, with task.class_names and model.num_classes set from train/'s class
    folders (or checked against them). Raises ConfigError for an unset data.root or names/counts that disagree,
    DataError for a missing split, a split without class folder or image, a class of val/ not in train/."""
    from rs_transfer.pretrain.shards import first_names

    train, val, classes = find_layout(config.data.root)
    set_class_names(config, classes, train)
    check_num_classes(config, len(classes))
    train_items, val_items = list_split(train, classes), list_split(val, classes)
    empty = _unused_classes(train_items, classes)
    if empty:  # kept, so the indices stay the folders' sorted order (and match another split or a later run)
        log.warning("%s: %d class folder(s) hold no image and keep their index, so the model gets outputs it never "
                    "learns: %s", train, len(empty), first_names(empty))
    unseen = [name for name in _unused_classes(val_items, classes) if name not in empty]
    if unseen:
        log.info("%s: no image of %d class(es), whose accuracy is not reported: %s", val, len(unseen),
                 first_names(unseen))
    log.info("folder_cls: %d classes, %d train and %d val images under %s", len(classes), len(train_items),
             len(val_items), config.data.root)
    return train_items, val_items


def build_model(config) -> Classifier:
    """The zoo classifier with one output per task.class_names (engine.classification.Classifier; eval mode: logits
    (N, classes)), from the config alone. Raises ConfigError when task.class_names is unset (a config never built
    on data) or model.num_classes disagrees, WeightsError for model.weights that do not fit."""
    from rs_transfer.engine.classification import Classifier
    from rs_transfer.models import create_model

    names = config.task.class_names
    if names is None:
        raise ConfigError("task.class_names is not set: folder_cls takes its classes from data.root/train "
                          "(a run's config.yaml has them)")
    check_num_classes(config, len(names))
    net = create_model(config.model.name, num_classes=len(names), weights=config.model.weights,
                       **arch_args(config))
    return Classifier(net, label_smoothing=config.train.label_smoothing)


def counting_skips(evaluate, datasets: tuple):
    """`evaluate`, followed at every evaluation by a warning when reads of `datasets` (ImageDatasets) were skipped as
    unreadable: pretraining counts them at its end, a transfer run has no such hook."""
    def evaluate_and_count(model) -> dict:
        metrics = evaluate(model)
        skipped = sum(dataset.skipped for dataset in datasets)
        if skipped:
            log.warning("%d reads of unreadable images were skipped so far (each is named above)", skipped)
        return metrics

    return evaluate_and_count


def build(config) -> Task:
    """The folder_cls Task (engine/task.py) from its run config: class folders under data.root, samples uint8
    (3, S, S) at S = task.image_size, the zoo classifier with a new head of one output per class, top-1/top-5/per-class
    accuracy on val/ (fractions). Raises ConfigError, DataError as `build_datasets`, WeightsError for model.weights
    that do not fit."""
    from rs_transfer.engine.classification import TopKEvaluator
    from rs_transfer.engine.task import Task
    from rs_transfer.pretrain.data import ImageDataset, collate
    from rs_transfer.pretrain.transforms import eval_transform, train_transform

    task_cfg = config.task
    train_items, val_items = build_datasets(config)
    train_set = ImageDataset(train_items, train_transform(task_cfg.image_size, "none",
                                                          scale=(task_cfg.crop_min_area, 1.0)))
    val_set = ImageDataset(val_items, eval_transform(task_cfg.image_size))
    model = build_model(config)
    evaluate = TopKEvaluator(val_set, len(task_cfg.class_names), task_cfg.eval_batch_size, config.data.num_workers,
                             collate_fn=collate, class_names=tuple(task_cfg.class_names))
    return Task(model=model, train_set=train_set, evaluate=counting_skips(evaluate, (train_set, val_set)),
                primary_metric=PROTOCOL.metric, collate_fn=collate)


def predict(model, config, image: torch.Tensor) -> torch.Tensor:
    """uint8 (3, H, W) -> class probabilities (classes,), through the evaluation transform at task.image_size."""
    from rs_transfer.engine.device import model_device
    from rs_transfer.pretrain.transforms import eval_transform

    pil = Image.fromarray(image.permute(1, 2, 0).numpy())
    batch = eval_transform(config.task.image_size)(pil)[None]
    logits = model({"image": batch.to(model_device(model))})
    return logits[0].float().softmax(0).cpu()


# The demo's classes: folder names with spaces and unicode, one colour each (scenes.COLOURS) and the shape the name
# says; sorted they are the class order.
SYNTHETIC_CLASSES = (("red circle", 0), ("green square", 1), ("blue circle", 2), ("yellow square", 3),
                     ("magenta circle", 4), ("Ünïcode square", 5))
SYNTHETIC_SUFFIXES = (".JPG", ".png", ".jpeg", ".PNG")


def _synthetic_image(rng, colour: np.ndarray, square: bool) -> Image.Image:
    """A noisy background with one filled square or disc of `colour` (plus noise), 40-96 px a side."""
    height, width = (int(side) for side in rng.integers(40, 97, size=2))
    image = background(rng, height, width)
    radius = rng.uniform(0.25, 0.45) * min(height, width)
    cy, cx = rng.uniform(radius, height - radius), rng.uniform(radius, width - radius)
    yy, xx = np.mgrid[:height, :width] + 0.5
    if square:
        mask = (np.abs(yy - cy) <= radius) & (np.abs(xx - cx) <= radius)
    else:
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2
    image[mask] = colour + rng.normal(0, 10, size=(int(mask.sum()), 3))
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


def write_folders(root, train: int = 240, val: int = 60, seed: int = 0) -> Path:
    """ROOT/train/<class>/img_<i><suffix> and ROOT/val/<class>/..., images of 40-96 px a side, JPEG and PNG with
    mixed-case extensions (every fourth PNG a palette image), `train` and `val` images spread over the classes;
    plus a text file and a hidden file in one class folder, which the reader ignores. Returns ROOT."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    for split, count in (("train", train), ("val", val)):
        for i in range(count):
            name, colour = SYNTHETIC_CLASSES[i % len(SYNTHETIC_CLASSES)]
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            image = _synthetic_image(rng, COLOURS[colour], square=name.endswith("square"))
            suffix = SYNTHETIC_SUFFIXES[i % len(SYNTHETIC_SUFFIXES)]
            if suffix.lower() == ".png" and i % 8 == 1:
                image = image.quantize(64)
            image.save(folder / f"img_{i:04d}{suffix}", format="JPEG" if "jp" in suffix.lower() else "PNG")
    first = root / "train" / SYNTHETIC_CLASSES[0][0]
    (first / "notes.txt").write_text("not an image: ignored and counted\n", encoding="utf-8")
    (first / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    return root


def write_synthetic(root, train: int, val: int):
    return write_folders(root, train=train, val=val)


# predict: top-5 classes with their probabilities per image (rs_transfer/predictor.py), named from the run's config
PREDICTOR = Predictor(read=read_image, predict=predict, write=write_top5,
                      class_names=lambda config: (tuple(config.task.class_names),
                                                  "task.class_names of the run (its train/ class folders)"),
                      suffixes=tuple(sorted(image_extensions())))

TASK = TransferTaskDeclaration(
    name="folder_cls", config=FolderClsConfig, build=build, protocol=PROTOCOL, write_synthetic=write_synthetic,
    build_model=build_model, predictor=PREDICTOR, check_data=check_data,
)
