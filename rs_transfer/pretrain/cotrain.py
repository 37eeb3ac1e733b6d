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
"""

from pathlib import Path

import torch
from torch.utils.data import Dataset

from rs_transfer.errors import UserError
from rs_transfer.pretrain import data


def pseudo_count(batch_size: int, ratio: float) -> int:
    return int(batch_size * ratio / (1 + ratio))


class SlotDataset(Dataset):
    def __init__(self, length: int):
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> int:
        return index


class MixedCollate:
    def __init__(self, labelled: data.ImageDataset, pseudo: data.ImageDataset, ratio: float, num_classes: int,
                 label_smoothing: float, targets: str):
        if targets not in ("soft", "hard"):
            raise UserError(f"cotrain.targets must be 'soft' or 'hard', got {targets!r}")
        self.labelled, self.pseudo = labelled, pseudo
        self.ratio = ratio
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        self.soft = targets == "soft"

    def one_hot(self, label: int) -> torch.Tensor:
        target = torch.full((self.num_classes,), self.label_smoothing / self.num_classes)
        target[label] += 1.0 - self.label_smoothing
        return target

    def pseudo_target(self, record: dict) -> torch.Tensor:
        if not self.soft or not record.get("topk"):
            return self.one_hot(record["label"])
        target = torch.zeros(self.num_classes)
        for index, prob in record["topk"]:
            target[index] = prob
        return target / target.sum()

    def __call__(self, slots: list) -> dict:
        n_pseudo = pseudo_count(len(slots), self.ratio)
        n_labelled = len(slots) - n_pseudo
        images, targets = [], []
        for slot in slots[:n_labelled]:
            image, label = self.labelled[slot % len(self.labelled)]
            images.append(image)
            targets.append(self.one_hot(label))
        for slot in slots[n_labelled:]:
            image, record = self.pseudo[slot % len(self.pseudo)]
            images.append(image)
            targets.append(self.pseudo_target(record))
        return {"image": torch.stack(images), "target": torch.stack(targets), "num_pseudo": torch.tensor(n_pseudo)}


def load_pseudo_set(folder: str | Path, transform, num_classes: int) -> data.ImageDataset:
    """The selected pseudo-labels of a `pseudo-label` output folder, as a dataset of (image, record)."""
    from rs_transfer.pretrain.pseudo_label import read_selection

    meta, records = read_selection(Path(folder))
    if meta["num_classes"] != num_classes:
        raise UserError(f"pseudo-labels in {folder} have {meta['num_classes']} classes, the model "
                        f"{num_classes} (model.num_classes, or the training split's class count when unset)")
    by_ref = {item.ref: item for item in data.list_images(Path(meta["images"]))}
    missing = [r["ref"] for r in records if r["ref"] not in by_ref]
    if missing:
        raise UserError(f"pseudo-labels in {folder} name {len(missing)} images not in {meta['images']}, "
                        f"e.g. {missing[0]}")
    return data.ImageDataset([by_ref[r["ref"]] for r in records], transform, targets=records)


def build(config, labelled: data.ImageDataset, num_classes: int) -> tuple:
    """(train dataset, collate function) for co-training; `labelled` is the supervised train set and
    `num_classes` the model's resolved class count (model.num_classes may be None: inferred from the data)."""
    c = config.cotrain
    if c.data_ratio <= 0:
        raise UserError(f"cotrain.data_ratio must be positive, got {c.data_ratio}")
    pseudo = load_pseudo_set(c.pseudo_labels, labelled.transform, num_classes)
    collate = MixedCollate(labelled, pseudo, c.data_ratio, num_classes, config.train.label_smoothing, c.targets)
    return SlotDataset(round(len(labelled) * (1 + c.data_ratio))), collate

