"""CIFAR-100 transfer: the python pickles as distributed (`cifar-100-python/{train,test}`), images resized to
`task.image_size` (the paper: 256), a new linear head on the zoo classifier, top-1.

data.root holds `cifar-100-python/` (or is it). Each pickle is a dict with byte-string keys: b"data" (N x 3072
uint8, the R, G and B planes of 32x32 images) and b"fine_labels" (N ints in 0..99).
"""

import pickle

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from rs_transfer.downstream.config import arch_args, check_num_classes
from rs_transfer.downstream.data import DatasetError, eval_loader, find_dir, model_device, require, to_device
from rs_transfer.downstream.fpn import Normalize
from rs_transfer.downstream.metrics import all_reduce_sum
from rs_transfer.engine.task import Task
from rs_transfer.models import create_model

NUM_CLASSES = 100


def read_cifar(root, split: str) -> tuple:
    folder = find_dir(root, ("cifar-100-python", "."), "CIFAR-100 (a cifar-100-python folder)")
    path = require(folder / split, f"the CIFAR-100 python pickle '{split}' (from cifar-100-python.tar.gz)")
    try:
        with open(path, "rb") as f:
            data = pickle.load(f, encoding="bytes")
        images = np.asarray(data[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(data[b"fine_labels"], dtype=np.int64)
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError) as error:
        raise DatasetError(f"{path} is not a CIFAR-100 pickle with b'data' (N x 3072) and b'fine_labels': "
                           f"{type(error).__name__}: {error}") from None
    if len(images) != len(labels) or labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise DatasetError(f"{path}: {len(images)} images, {len(labels)} labels in "
                           f"{labels.min()}..{labels.max()}: expected one label in 0..99 per image")
    return images, labels


class Cifar100(Dataset):
    def __init__(self, root, split: str, transform):
        self.images, self.labels = read_cifar(root, split)
        self.transform = transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        image = self.transform(tv_tensors.Image(torch.from_numpy(self.images[index])))
        return {"image": image.as_subclass(torch.Tensor), "label": torch.tensor(self.labels[index])}


def transforms(image_size: int, train: bool) -> v2.Compose:
    steps = [v2.Resize((image_size, image_size), antialias=True)]  # a no-op at 32
    return v2.Compose(steps + [v2.RandomHorizontalFlip()] if train else steps)


class Classifier(nn.Module):
    """batch {"image", "label"} -> {"loss"} in train mode; logits in eval mode."""

    def __init__(self, backbone: str, weights=None, label_smoothing: float = 0.0, **arch):
        super().__init__()
        self.normalize = Normalize()
        self.net = create_model(backbone, num_classes=NUM_CLASSES, weights=weights, **arch)
        self.label_smoothing = label_smoothing

    def forward(self, batch: dict):
        logits = self.net(self.normalize(batch["image"]))
        if not self.training:
            return logits
        loss = F.cross_entropy(logits, batch["label"], label_smoothing=self.label_smoothing)
        return {"loss": loss, "train_top1": (logits.argmax(1) == batch["label"]).float().mean()}


def make_evaluator(val_set, batch_size: int, num_workers: int = 0):
    def evaluate(model: nn.Module) -> dict:
        device = model_device(model)
        counts = torch.zeros(3, dtype=torch.float64, device=device)
        with torch.no_grad():
            for batch in eval_loader(val_set, batch_size, None, num_workers):
                batch = to_device(batch, device)
                top5 = model(batch).topk(5, dim=1).indices
                hits = top5 == batch["label"][:, None]
                counts += torch.stack([hits[:, 0].sum(), hits.any(1).sum(), torch.tensor(len(hits), device=device)]).double()
        correct1, correct5, total = all_reduce_sum(counts).tolist()
        return {"top1": correct1 / total, "top5": correct5 / total}

    return evaluate


def build(config) -> Task:
    t = config.task
    check_num_classes(config, NUM_CLASSES)
    train_set = Cifar100(config.data.root, "train", transforms(t.image_size, train=True))
    val_set = Cifar100(config.data.root, "test", transforms(t.image_size, train=False))
    model = Classifier(config.model.name, weights=config.model.weights, label_smoothing=config.train.label_smoothing,
                       drop_rate=config.model.drop_rate, **arch_args(config))
    return Task(model=model, train_set=train_set, evaluate=make_evaluator(val_set, t.eval_batch_size, config.data.num_workers),
                primary_metric="top1")
