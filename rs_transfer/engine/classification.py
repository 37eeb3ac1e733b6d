"""Classification for the engine: the one model wrapper (network + normalisation + cross-entropy) and the one
top-k counter, shared by ImageNet pretraining (pretrain/task.py), CIFAR-100 and class-folder fine-tuning
(downstream/cifar100.py, downstream/folder_cls.py, which also reports per-class accuracy) and video classification
(video/task.py); the first two families evaluate with TopKEvaluator, video's 30-view evaluator (video/task.py
evaluate_videos) averages each video's views first and counts with TopK.

They live in the engine, not in one of those tasks nor in models/: three task families use them (a copy per task
is a job written three times), and models/ holds networks only, without losses or distributed evaluation.

Batches are dicts: "image" uint8 images (N, 3, H, W) or clips (N, 3, T, H, W) as the loaders ship them, and
"label" int64 class indices (N,) or "target" float soft targets (N, classes) (co-training's pseudo-labels).
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from torchmetrics.classification import MulticlassAccuracy

from rs_transfer.engine.device import model_device, to_device
from rs_transfer.engine.distributed import all_reduce_sum
from rs_transfer.engine.loader import close_loader, eval_loader
from rs_transfer.models.normalize import Normalize

TOP_K = (1, 5)


class Classifier(nn.Module):
    """The engine's model for classification (engine/task.py's contract): `net` is the network to export.

    Train mode: batch -> {"loss", "train_top1"}: label-smoothed cross-entropy against "label" (and the batch's
    top-1 accuracy, logged), or cross-entropy against "target" (soft targets carry their own smoothing; no
    accuracy). Eval mode: batch -> logits (N, classes), "label" / "target" are not needed.
    Images are normalised here, on the device (models.normalize.Normalize); its buffers are not persistent, so the
    state dict is `net.` + the network's own keys.
    """

    def __init__(self, net: nn.Module, label_smoothing: float = 0.0):
        super().__init__()
        self.normalize = Normalize()
        self.net = net
        self.label_smoothing = label_smoothing

    def forward(self, batch: dict):
        logits = self.net(self.normalize(batch["image"]))
        if not self.training:
            return logits
        if "target" in batch:
            loss = torch.sum(-batch["target"] * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
            return {"loss": loss}
        labels = batch["label"]
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
        return {"loss": loss, "train_top1": (logits.argmax(1) == labels).float().mean()}


class TopK:
    """Top-1 and top-5 hits (top-k capped at the class count) over the samples of this rank, counted by torchmetrics'
    MulticlassAccuracy (micro average: hits / samples); with `per_class`, also each class's top-1 hits and samples
    (average="none" keeps them per class).

    Each rank counts its own samples without torchmetrics' own synchronisation; `counts()` hands the integers to
    the caller, who sums them over ranks with whatever else it counts (`all_reduce_sum`) and divides once: the
    fractions are exact (float64), the same on every rank, and a rank with no sample adds zeros.
    """

    def __init__(self, num_classes: int, device: torch.device, per_class: bool = False):
        self.metrics = {k: MulticlassAccuracy(num_classes, top_k=min(k, num_classes), average="micro",
                                              sync_on_compute=False).to(device) for k in TOP_K}
        self.per_class = MulticlassAccuracy(num_classes, top_k=1, average="none",
                                            sync_on_compute=False).to(device) if per_class else None

    def update(self, scores: torch.Tensor, labels: torch.Tensor) -> None:
        """scores: (N, classes) logits or probabilities (any float dtype); labels: (N,) class indices."""
        for metric in self.metrics.values():
            metric.update(scores.float(), labels)
        if self.per_class is not None:
            self.per_class.update(scores.float(), labels)

    def counts(self) -> torch.Tensor:
        """float64 (len(TOP_K) + 1,): top-k hits for each k in TOP_K, then the number of samples; with `per_class`
        followed by (2 x classes,): each class's top-1 hits, then each class's samples."""
        states = [metric.metric_state for metric in self.metrics.values()]
        hits = [state["tp"].sum() for state in states]
        total = states[0]["tp"].sum() + states[0]["fn"].sum()  # each sample is a hit or a miss of its label
        counts = [torch.stack([*hits, total])]
        if self.per_class is not None:
            state = self.per_class.metric_state
            counts += [state["tp"], state["tp"] + state["fn"]]
        return torch.cat(counts).double()


def fractions(counts, class_names=None) -> dict:
    """{"top1", "top5"} from `TopK.counts()` summed over ranks.

    With `class_names` (the counts of a TopK with per_class, one name per class): top-k is left out when there are
    fewer than k classes (a top-5 of 3 classes is 1 whatever the model), and "acc/<name>" is each class's top-1
    accuracy, for the classes that have samples (a class without any has no accuracy, as segmentation leaves out a
    class absent from the data)."""
    values = [float(c) for c in counts]
    *hits, total = values[:len(TOP_K) + 1]
    if class_names is None:
        return {f"top{k}": h / total for k, h in zip(TOP_K, hits)}
    metrics = {f"top{k}": h / total for k, h in zip(TOP_K, hits) if k <= len(class_names)}
    per_class = values[len(TOP_K) + 1:]
    class_hits, class_totals = per_class[:len(class_names)], per_class[len(class_names):]
    for name, h, n in zip(class_names, class_hits, class_totals):
        if n:
            metrics[f"acc/{name}"] = h / n
    return metrics


class TopKEvaluator:
    """Top-1/top-5 accuracy of `model(batch)`'s logits (eval mode) over `dataset`: each rank evaluates a contiguous
    part (engine.distributed.shard, through eval_loader) and the counts are summed over ranks.

    dataset: samples {"image", "label"} (or what `collate_fn` turns into such a batch); num_classes: the model's;
    class_names: None, or one name per class for the per-class accuracies (`fractions`).
    Returns {"top1", "top5"} (with class_names: top5 only with at least 5 classes, and "acc/<name>"), fractions,
    identical on every rank.
    """

    def __init__(self, dataset: Dataset, num_classes: int, batch_size: int, num_workers: int = 0, collate_fn=None,
                 class_names=None):
        self.dataset = dataset
        self.num_classes = num_classes
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.collate_fn = collate_fn
        self.class_names = class_names
        # Built at the first call and kept: its workers persist between evaluations (no worker start-up per
        # evaluation), until `close` (the trainer calls it at the end of the run).
        self.loader = None

    def __call__(self, model: nn.Module) -> dict:
        device = model_device(model)
        topk = TopK(self.num_classes, device, per_class=self.class_names is not None)
        with torch.no_grad():  # the engine calls this inside its autocast (train.amp)
            if self.loader is None:
                self.loader = eval_loader(self.dataset, self.batch_size, self.collate_fn, self.num_workers, device,
                                          persistent=True)
            for batch in self.loader:
                batch = to_device(batch, device)
                topk.update(model(batch), batch["label"])
        return fractions(all_reduce_sum(topk.counts()), self.class_names)

    def close(self) -> None:
        """Shut the kept loader's workers down (the next call starts new ones)."""
        close_loader(self.loader)
        self.loader = None
