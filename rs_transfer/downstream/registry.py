"""The transfer tasks by name: the one registry that `finetune`, `sweep`, `demo`, the CLI's `--task` choices and
Table 5 read.

A task is one module that declares `TASK = TransferTask(...)`: its run config (a dataclass whose `task` section is
the task's own), its builder (config -> the engine's `Task`: datasets, model with its loss, evaluator), its
protocol (metric, grid lengths, batch, crop, Table 5 column), its synthetic-data writer, its Table 5 numbers, and
for `rs-transfer predict` its model-only builder and its Predictor (rs_transfer/predict.py).
Adding a task is that module, its YAML configs and one line in `MODULES` (or `register(name, module)` for a module
outside the package). Modules are imported only when a task is used, so `rs-transfer --help` imports no torch.
"""

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from rs_transfer.errors import UserError

# Task name -> module. The order is Table 5's column order.
MODULES = {
    "cifar100": "rs_transfer.downstream.cifar100",
    "pascal_det": "rs_transfer.downstream.pascal_det",
    "pascal_seg": "rs_transfer.downstream.pascal_seg",
    "ade_seg": "rs_transfer.downstream.ade_seg",
    "nyu_depth": "rs_transfer.downstream.nyu_depth",
}


@dataclass(frozen=True)
class TransferTask:
    name: str
    config: type  # the run config: a FinetuneConfig subclass whose `task` field is this task's section
    build: Callable  # build(config) -> rs_transfer.engine.task.Task
    protocol: "object"  # rs_transfer.downstream.protocol.Protocol: metric, grid lengths, batch, crop, column
    write_synthetic: Callable  # write_synthetic(root, train, val) -> the data.root of a tiny dataset in the real format
    paper: dict = field(default_factory=dict)  # Table 5, percent: (backbone, method, pretraining epochs) -> value
    config_dir: Optional[Path] = None  # holds <name>.yaml and <name>_demo.yaml; None: the packaged downstream/
    # build_model(config) -> the task's model alone (no data read; `build` uses it), for `predict` and export
    build_model: Optional[Callable] = None
    predictor: "object" = None  # rs_transfer.predict.Predictor: `rs-transfer predict`; None: the task has none

    @property
    def metric(self) -> str:
        return self.protocol.metric


def register(name: str, module: str) -> None:
    """Add a task whose module lives outside this package (a plugin, a test)."""
    MODULES[name] = module


def names() -> tuple:
    return tuple(MODULES)


def get(name: str) -> TransferTask:
    if name not in MODULES:
        raise UserError(f"unknown task {name!r}: expected one of {', '.join(MODULES)}")
    task = importlib.import_module(MODULES[name]).TASK
    if task.name != name:
        raise UserError(f"module {MODULES[name]} declares task {task.name!r}, registered as {name!r}")
    return task
