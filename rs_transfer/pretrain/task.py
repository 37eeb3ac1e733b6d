"""ImageNet-style classification as an engine Task: data, a zoo network in the engine's classification wrapper
(engine/classification.py: normalisation, cross-entropy) and its top-1/top-5 evaluator."""

import logging
from pathlib import Path

import torch
from PIL import Image

from rs_transfer.config import data_root, record_inferred
from rs_transfer.engine import distributed
from rs_transfer.engine.classification import Classifier, TopKEvaluator
from rs_transfer.engine.device import model_device
from rs_transfer.engine.task import Task
from rs_transfer.families import TaskDeclaration
from rs_transfer.errors import UserError
from rs_transfer.models import create_model
from rs_transfer.models.zoo import ArchArgs
from rs_transfer.pretrain import data, transforms
from rs_transfer.pretrain.config import PretrainConfig, check_cotrain
from rs_transfer.predictor import Predictor, read_image, write_top5

log = logging.getLogger(__name__)


def build_datasets(config: PretrainConfig) -> tuple:
    """(train items, eval items, class names) of data.root, with the minival split applied when asked.

    model.num_classes unset (None) is inferred from the training split and written back into `config`, so the
    model, co-training and the run's saved config.yaml all hold the one count (set, it is checked instead)."""
    data_root(config.data.root, "train/<class>/<images> and val/<class>/<images>")
    num_classes = config.model.num_classes
    train_items, classes = data.load_split(config.data.root, "train", num_classes)
    if num_classes is None:
        num_classes = data.infer_num_classes(train_items, classes, Path(config.data.root) / "train")
        record_inferred(config, "model.num_classes", num_classes)
        log.info("model.num_classes=%d, from %s/train", num_classes, config.data.root)
    if config.data.eval_split == "minival":
        train_items, eval_items = data.minival_split(train_items, config.data.minival_fraction,
                                                     config.data.minival_seed)
    elif config.data.eval_split == "val":
        eval_items, _ = data.load_split(config.data.root, "val", num_classes, classes)
    else:
        raise UserError(f"data.eval_split must be 'val' or 'minival', got {config.data.eval_split!r}")
    return train_items, eval_items, classes


def _check_dali(config: PretrainConfig) -> None:
    """Raises UserError when data.backend=dali meets a missing DALI or a config the DALI path does not do."""
    from rs_transfer.pretrain.dali import import_dali

    import_dali()
    if config.cotrain.enabled:
        raise UserError("data.backend=dali does not do co-training (soft targets); use data.backend=torch")
    if config.augment.randaugment == "timm":
        raise UserError("data.backend=dali implements the TF RandAugment only: set augment.randaugment=tf (or none), "
                        "or data.backend=torch")


def _dali_loader(config: PretrainConfig, train_items):
    """The engine's `make_loader` for data.backend=dali: DALI batches of the engine's keys (see pretrain/dali.py)."""
    from rs_transfer.pretrain.dali import FEEDER_WORKERS, DaliBatches

    layers = 0 if config.augment.randaugment == "none" else config.augment.num_layers
    read = data.EncodedImages(train_items)

    def make_loader(keys, batch_size: int, device: torch.device) -> DaliBatches:
        device_id = (device.index if device.index is not None else torch.cuda.current_device()) \
            if device.type == "cuda" else None
        workers = distributed.loader_workers(config.data.num_workers)[0]
        # The Python feeder (file reads, headers, random parameters) in DALI's parallel external source, off the
        # training thread; data.num_workers=0 keeps it there. "spawn" once CUDA is up (a fork would copy its state).
        return DaliBatches(read, keys, batch_size, config.data.image_size, config.data.crop_min_area, layers,
                           config.augment.magnitude, device_id=device_id, num_threads=max(1, workers),
                           seed=config.seed, py_workers=min(workers, FEEDER_WORKERS),
                           py_start_method="spawn" if device.type == "cuda" else "fork")

    return make_loader


def build_model(config: PretrainConfig) -> Classifier:
    """The network of model.* (model.num_classes set) in engine.classification.Classifier (eval mode: logits
    (N, classes)), no data read: a zoo ResNet, or timm's efficientnet_b0 ... b7 for EfficientNet-RS
    (models.create_model builds both; an EfficientNet takes model.drop_rate and model.drop_path_rate only).
    Raises UserError for a ResNet switch (model.init, zero_init_last, bn_momentum, drop_path_schedule) set away
    from its default for an EfficientNet, WeightsError for model.weights that do not fit."""
    model_cfg = config.model
    net = create_model(model_cfg.name, num_classes=model_cfg.num_classes, weights=model_cfg.weights,
                       **ArchArgs.from_config(model_cfg).as_dict())
    return Classifier(net, config.train.label_smoothing)


def predict(model, config: PretrainConfig, image: torch.Tensor) -> torch.Tensor:
    """uint8 (3, H, W) -> class probabilities (classes,): the evaluation transform (transforms.eval_transform: TF's
    centre crop at data.eval_image_size, or the training size)."""
    pil = Image.fromarray(image.permute(1, 2, 0).numpy())
    batch = transforms.eval_transform(config.data.eval_image_size or config.data.image_size)(pil)[None]
    logits = model({"image": batch.to(model_device(model))})
    return logits[0].float().softmax(0).cpu()


def class_names(config: PretrainConfig) -> tuple:
    """(names, where from): the class folders of data.root/train when they are there and as many as the model's
    outputs; else (None, why), and predictions name classes by index."""
    train = Path(config.data.root or "") / "train"
    try:
        names = data.find_classes(train)
    except (OSError, UserError) as error:
        return None, f"indices: the class folders of {train} cannot be read ({type(error).__name__})"
    if len(names) != config.model.num_classes:
        return None, f"indices: {train} has {len(names)} class folders, the model {config.model.num_classes} outputs"
    return tuple(names), f"the class folders of {train}"


# predict: top-5 classes with their probabilities per image (rs_transfer/predictor.py)
PREDICTOR = Predictor(read=read_image, predict=predict, write=write_top5, class_names=class_names)


def build_task(config: PretrainConfig) -> Task:
    """The pretraining Task: class folders or indexed tar shards under data.root (plus pseudo-labels when
    cotrain.enabled), the zoo network in engine.classification.Classifier (eval mode: logits (N, classes)),
    top-1/top-5 on data.eval_split (and, with train.report_best and data.eval_split=minival, the best checkpoint's
    on val: `Task.report`). Raises UserError for co-training without pseudo-labels or an unsupported DALI
    setting, DataError for a missing or malformed dataset or a model.num_classes that disagrees with the class
    folders, WeightsError for model.weights that do not fit."""
    check_cotrain(config)
    if config.data.backend == "dali":
        _check_dali(config)  # before the data are read
    train_items, eval_items, classes = build_datasets(config)
    size = config.data.image_size
    augment = config.augment
    train_set = data.ImageDataset(train_items, transforms.train_transform(
        size, augment.randaugment, augment.num_layers, augment.magnitude, augment.timm_config,
        scale=(config.data.crop_min_area, 1.0), fast_decode=config.data.fast_decode))
    eval_set = data.ImageDataset(eval_items, transforms.eval_transform(config.data.eval_image_size or size))
    collate_fn = data.collate
    if config.cotrain.enabled:
        from rs_transfer.pretrain import cotrain

        train_set, collate_fn = cotrain.build(config, train_set, config.model.num_classes)
    model_cfg = config.model
    model = build_model(config)
    make_loader = _dali_loader(config, train_items) if config.data.backend == "dali" else None
    _, world, _ = distributed.launcher_env()
    evaluate = TopKEvaluator(eval_set, model_cfg.num_classes, max(1, config.train.batch_size // world),
                             config.data.num_workers,
                             collate_fn=data.collate)
    report = None
    if config.train.report_best and config.data.eval_split == "minival":
        # Early stopping as the paper does: the best checkpoint is picked on minival and reported on val.
        val_items, _ = data.load_split(config.data.root, "val", model_cfg.num_classes, classes)
        val_set = data.ImageDataset(val_items, transforms.eval_transform(config.data.eval_image_size or size))
        report = TopKEvaluator(val_set, model_cfg.num_classes, max(1, config.train.batch_size // world),
                               config.data.num_workers, collate_fn=data.collate)
    log.info("pretrain data: %d train images, %d %s images, %d classes", len(train_items), len(eval_items),
             config.data.eval_split, model_cfg.num_classes)
    return Task(model=model, train_set=train_set, evaluate=evaluate, primary_metric="top1", collate_fn=collate_fn,
                make_loader=make_loader, report=report)


def skipped_reads(task: Task) -> int:
    """How many reads of unreadable training images the pretraining `task` skipped (each was named in a warning):
    its train set's count, or with co-training (the train set holds slots) the mixed collate's, over both sets."""
    counted = task.train_set if task.collate_fn is data.collate else task.collate_fn
    return counted.skipped


# The family's declaration (rs_transfer/families.py): what `runs`, `predict`, `evaluate` and `export` read.
TASK = TaskDeclaration(name="pretrain", family="pretrain", config=PretrainConfig, build=build_task, build_model=build_model,
                       predictor=PREDICTOR, metric="top1",
                       eval_size=lambda config: config.data.eval_image_size or config.data.image_size)
