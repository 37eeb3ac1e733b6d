"""Co-training on labelled and pseudo-labelled images, each batch split at Model Garden's `data_ratio`.

With ratio r, a batch of B samples holds int(B * r / (1 + r)) pseudo-labelled and the rest labelled ones, exactly,
in every batch. The engine hands one dataset to one sampler, so the split happens in the collate function (which
runs in the DataLoader workers): the dataset yields slot numbers, the sampler shuffles them as usual (so DDP
sharding and exact resume keep working), and the collate function turns the first slots of a batch into labelled
samples (slot mod L) and the last ones into pseudo-labelled samples (slot mod P), decoding only what it uses.
An epoch is L * (1 + r) slots, i.e. about one pass over the labelled set.

Targets are probability vectors for the whole batch: labelled samples one-hot with label smoothing; pseudo-labelled
ones either the teacher's stored top-k probabilities renormalised ("soft", Noisy Student's default, temperature 1)
or its hard label with label smoothing ("hard").

The pseudo-labelled set is the rows `selected.npy` picks from the memory-mapped table of a `pseudo-label` folder
(pseudo_label.py), joined to the image set by index: no Python object per image, and the selection is sorted by
image index, so consecutive positions read the same shards.
"""

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from rs_transfer.errors import UserError
from rs_transfer.pretrain import data
from rs_transfer.pretrain.pseudo_label import read_selection


def pseudo_count(batch_size: int, ratio: float) -> int:
    return int(batch_size * ratio / (1 + ratio))


def one_hot(label: int, num_classes: int, label_smoothing: float) -> torch.Tensor:
    target = torch.full((num_classes,), label_smoothing / num_classes)
    target[label] += 1.0 - label_smoothing
    return target


class SlotDataset(Dataset):
    """Slot numbers 0..length-1 (see the module docstring); `locality`: consecutive slots an epoch should shuffle
    together so that both sets keep to a few tar shards at a time (0: any order)."""

    def __init__(self, length: int, locality: int = 0):
        self.length = length
        self.locality = locality

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> int:
        return index


class MixedCollate:
    """Slots -> a batch {"image", "target", "num_pseudo"}: the first slots labelled, the last pseudo-labelled."""

    def __init__(self, labelled: data.ImageDataset, pseudo: data.ImageDataset, ratio: float, num_classes: int,
                 label_smoothing: float):
        self.labelled, self.pseudo = labelled, pseudo
        self.ratio = ratio
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing

    @property
    def skipped(self) -> int:
        """Reads of unreadable images skipped in both sets (ImageDataset.skipped, over all loader workers)."""
        return self.labelled.skipped + self.pseudo.skipped

    def __call__(self, slots: list) -> dict:
        n_pseudo = pseudo_count(len(slots), self.ratio)
        n_labelled = len(slots) - n_pseudo
        images, targets = [], []
        for slot in slots[:n_labelled]:
            image, label = self.labelled[slot % len(self.labelled)]
            images.append(image)
            targets.append(one_hot(label, self.num_classes, self.label_smoothing))
        for slot in slots[n_labelled:]:
            image, target = self.pseudo[slot % len(self.pseudo)]
            images.append(image)
            targets.append(target)
        return {"image": torch.stack(images), "target": torch.stack(targets), "num_pseudo": torch.tensor(n_pseudo)}


class PseudoLabels:
    """The selected rows of a `pseudo-label` folder as a sequence of images (what ImageDataset reads; position i is
    image `table["index"][selected[i]]` of the image set), and `target(i)`, its soft or hard target.

    The columns are memory maps opened in each process on first use; a pickled copy (a DataLoader worker under
    spawn) carries the folder's path, not the columns. `locality`: selected positions per SHARDS_PER_BLOCK shards
    (the image set's locality scaled by the fraction selected), 0 for a folder of images."""

    def __init__(self, folder: Path, images, count: int, num_classes: int, soft: bool, label_smoothing: float):
        self.folder, self.images, self.count = folder, images, count
        self.num_classes, self.soft, self.label_smoothing = num_classes, soft, label_smoothing
        share = getattr(images, "locality", 0) * count / len(images)
        self.locality = max(1, int(share)) if share else 0
        self._columns = None

    def __getstate__(self):
        return {**self.__dict__, "_columns": None}

    def columns(self) -> tuple:
        """(table, selected) memory maps of this process."""
        if self._columns is None:
            _, table, selected = read_selection(self.folder)
            self._columns = table, selected
        return self._columns

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, position: int):
        table, selected = self.columns()
        return self.images[int(table["index"][selected[position]])]

    def target(self, position: int) -> torch.Tensor:
        table, selected = self.columns()
        row = int(selected[position])
        classes, probs = table["topk_class"][row], table["topk_prob"][row]
        if not self.soft or len(classes) == 0:
            return one_hot(int(table["label"][row]), self.num_classes, self.label_smoothing)
        target = torch.zeros(self.num_classes)
        target[torch.from_numpy(classes.astype(np.int64))] = torch.from_numpy(probs.astype(np.float32))
        return target / target.sum()


class _Targets:
    """ImageDataset's `targets`: position -> target vector, built when asked."""

    def __init__(self, labels: PseudoLabels):
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, position: int) -> torch.Tensor:
        return self.labels.target(position)


def load_pseudo_set(folder: str | Path, transform, num_classes: int, targets: str = "soft",
                    label_smoothing: float = 0.0) -> data.ImageDataset:
    """The selected pseudo-labels of a `pseudo-label` output folder, as a dataset of (image, target vector).

    `targets`: "soft" (the stored top-k probabilities renormalised; the hard label when the folder kept none) or
    "hard" (the label, one-hot with `label_smoothing`). Raises UserError when the class count differs from the
    model's or the image set named in meta.json no longer has the sample count it had when labelled."""
    if targets not in ("soft", "hard"):
        raise UserError(f"cotrain.targets must be 'soft' or 'hard', got {targets!r}")
    folder = Path(folder)
    meta, _, selected = read_selection(folder)
    if meta["num_classes"] != num_classes:
        raise UserError(f"pseudo-labels in {folder} have {meta['num_classes']} classes, the model "
                        f"{num_classes} (model.num_classes, or the training split's class count when unset)")
    images = data.list_images(Path(meta["images"]))
    if len(images) != meta["samples"]:
        raise UserError(f"pseudo-labels in {folder} are of {meta['samples']} images, {meta['images']} now holds "
                        f"{len(images)}: the image set changed; label it again with a new --out")
    if meta.get("images_digest") not in (None, data.image_set_digest(images)):
        raise UserError(f"pseudo-labels in {folder} are of other images than {meta['images']} now holds (shard names, "
                        "sizes or image names changed): label it again with a new --out")
    labels = PseudoLabels(folder, images, len(selected), num_classes, targets == "soft", label_smoothing)
    return data.ImageDataset(labels, transform, targets=_Targets(labels))


def build(config, labelled: data.ImageDataset, num_classes: int) -> tuple:
    """(train dataset, collate function) for co-training; `labelled` is the supervised train set and
    `num_classes` the model's resolved class count (model.num_classes may be None: inferred from the data)."""
    cotrain_cfg = config.cotrain
    if cotrain_cfg.data_ratio <= 0:
        raise UserError(f"cotrain.data_ratio must be positive, got {cotrain_cfg.data_ratio}")
    smoothing = config.train.label_smoothing
    pseudo = load_pseudo_set(cotrain_cfg.pseudo_labels, labelled.transform, num_classes, cotrain_cfg.targets, smoothing)
    collate = MixedCollate(labelled, pseudo, cotrain_cfg.data_ratio, num_classes, smoothing)
    localities = [n for n in (labelled.locality, pseudo.locality) if n]
    return SlotDataset(round(len(labelled) * (1 + cotrain_cfg.data_ratio)), min(localities, default=0)), collate
