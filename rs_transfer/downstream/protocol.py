"""The paper's fine-tuning protocol (Appendix F, PAPER.md section 5): what every task shares, and Table 5 as the
tasks declare it.

Each task's own numbers (metric, grid lengths, batch, crop or image size, its Table 5 column) sit in its module's
`TASK` (rs_transfer/downstream/registry.py); `rs-transfer sweep` runs `grid(task)`; `rs-transfer reproduce table5`
prints `table5()` as the reference rows. A run reads its batch, crop, weight decay, schedule and scale jitter from
the task's YAML (rs_transfer/configs/downstream/<task>.yaml, the record of the run, saved with it); this module is
the one source those YAMLs are checked against: tests/test_downstream_models.py checks every package task's full
config against its `Protocol` and the shared values below, and these numbers against PAPER.md.
"""

from dataclasses import dataclass

from rs_transfer.downstream import registry

LEARNING_RATES = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32)
WEIGHT_DECAY = 1e-4
SCHEDULE = "cosine"
SCALE_RANGE = (0.5, 2.0)


@dataclass(frozen=True)
class Protocol:
    """One task's part of the protocol, as the paper states it; its full config holds the same values (tested)."""

    metric: str  # the key in final_metrics.json, a fraction
    steps: tuple  # the training lengths of the grid
    batch_size: int  # global batch: train.batch_size
    crop_size: int | None  # training crop: task.crop_size; None for a task trained on whole images
    column: str  # the Table 5 column
    image_size: int | None = None  # whole images resized to this: task.image_size (cifar100); None for crops


def protocols() -> dict:
    """Task name -> Protocol, for every registered task."""
    return {name: registry.get(name).protocol for name in registry.names()}


def table5_tasks() -> tuple:
    """Table 5's columns: the registered tasks that state paper numbers, in registry order."""
    return tuple(name for name in registry.names() if registry.get(name).paper)


def table5() -> dict:
    """(backbone, method, pretraining epochs) -> one value per `table5_tasks()` column (None where a task states
    none for that row), percent."""
    tasks = [registry.get(name) for name in table5_tasks()]
    rows = {}
    for task in tasks:
        for row in task.paper:
            rows.setdefault(row, None)
    return {row: tuple(task.paper.get(row) for task in tasks) for row in rows}


def paper_value(backbone: str, method: str, task: str) -> float:
    for (b, m, _), value in registry.get(task).paper.items():
        if b == backbone and m == method:
            return value
    raise KeyError((backbone, method))


def grid(task: str, learning_rates=None, steps=None) -> list:
    """Every (lr, steps) point of the task's grid (or of the given values), in the one order used everywhere:
    shortest training first, and within one length the learning rates from low to high. `sweep` runs them in
    this order and `sweep --point I` runs `grid(task)[I]`."""
    return [(lr, s) for s in (steps or registry.get(task).protocol.steps) for lr in (learning_rates or LEARNING_RATES)]


def point_name(lr: float, steps: int) -> str:
    return f"lr{lr:g}_steps{steps}"
