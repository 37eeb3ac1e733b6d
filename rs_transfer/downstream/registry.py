"""The transfer tasks by name: the one registry that `finetune`, `sweep`, `demo`, the CLI's `--task` choices and
Table 5 read.

A task is one module that declares `TASK = TransferTaskDeclaration(...)`: its run config (a dataclass whose `task`
section is the task's own), its builder (config -> the engine's `Task`: datasets, model with its loss, evaluator), its
protocol (metric, grid lengths, batch, crop, Table 5 column), its synthetic-data writer, its Table 5 numbers, and for
`rs-transfer predict` its model-only builder and its Predictor (rs_transfer/predictor.py), and its layout check.

Importing a task module imports no torch (nor torchvision, timm, torchmetrics, scipy): its builders import them
where they run, so `finetune` answers a config, layout or weights mistake in a fraction of a second, not after the
seconds that importing torch takes.

Where names come from, first found wins: `MODULES` (the package's tasks, one line each), `register(name, module)`
(one Python process: a test, a notebook), then installed packages that declare an entry point in the group
`rs_transfer.tasks` (name = task name, value = module path; the standard Python plugin mechanism, read with
importlib.metadata), so `rs-transfer finetune --task NAME` knows a task that lives in another package.
Names are read without importing any task module, so `rs-transfer --help` imports no torch; a module is imported
when its task is used.
"""

import functools
import importlib
import logging
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Callable, Optional

from rs_transfer.errors import UserError

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "rs_transfer.tasks"

# Task name -> module: the paper's tasks in Table 5's column order, then the own-data tasks (docs/downstream.md).
MODULES = {
    "cifar100": "rs_transfer.downstream.cifar100",
    "pascal_det": "rs_transfer.downstream.pascal_det",
    "pascal_seg": "rs_transfer.downstream.pascal_seg",
    "ade_seg": "rs_transfer.downstream.ade_seg",
    "nyu_depth": "rs_transfer.downstream.nyu_depth",
    "folder_cls": "rs_transfer.downstream.folder_cls",
    "coco_det": "rs_transfer.downstream.coco_det",
    "folder_seg": "rs_transfer.downstream.folder_seg",
}


EVAL_MODES = ("whole", "slide")  # task.eval_mode (dense tasks): the whole image at once, or mmseg's windows
TTA_MODES = ("none", "flip", "ms_flip")  # task.tta: single-scale, + horizontal flip, multi-scale x flip


def metric_suffix(eval_mode: str | None = "whole", tta: str | None = "none") -> str:
    """The suffix of a metric's name computed with `eval_mode` and `tta` (None: a task or an old config without the
    key): "" for single-scale whole-image inference, else "_slide", "_flip", "_ms_flip", "_slide_ms_flip", ... so a
    sliding-window or TTA number cannot pass for a single-scale one in final_metrics.json, summaries, sweeps and
    Table 5 (mmsegmentation issues #140, #280)."""
    return ("_slide" if eval_mode == "slide" else "") + ("" if tta in (None, "none") else f"_{tta}")


def section_suffix(section) -> str:
    """metric_suffix of a task section: the dataclass, or the dict a run's config.yaml holds (None, or a key
    missing, as in runs written before these keys: the default)."""
    if section is None:
        return ""
    get = section.get if isinstance(section, dict) else lambda key, default: getattr(section, key, default)
    return metric_suffix(get("eval_mode", "whole"), get("tta", "none"))


@dataclass(frozen=True)
class TransferTaskDeclaration:
    """What a transfer task's module declares as `TASK`: the attributes of rs_transfer/families.py's
    TaskDeclaration (config, build, build_model, predictor, metric_of, family, sample_unit) plus the transfer
    family's own (protocol, Table 5 numbers, synthetic data, config folder, layout check); the module docstring above
    lists the parts.

    check_data(config), when a task has it, checks the data.root layout before anything heavy runs: `finetune` calls
    it after the config and the weights file are checked (and after a --synthetic dataset is written) and before
    torch is imported. It raises ConfigError when data.root is unset and DataError naming the missing folder or file,
    with the builder's own messages; it must stay cheap (the folders and files the layout names, never every image)
    and torch-free. The builder keeps its own checks: it can be called without check_data."""

    name: str
    config: type  # the run config: a FinetuneConfig subclass whose `task` field is this task's section
    build: Callable  # build(config) -> rs_transfer.engine.task.Task
    protocol: "object"  # rs_transfer.downstream.protocol.Protocol: metric, grid lengths, batch, crop, column
    write_synthetic: Callable  # write_synthetic(root, train, val) -> the data.root of a tiny dataset in the real format
    paper: dict = field(default_factory=dict)  # Table 5, percent: (backbone, method, pretraining epochs) -> value
    config_dir: Optional[Path] = None  # holds <name>.yaml and <name>_demo.yaml; None: the packaged downstream/
    # build_model(config) -> the task's model alone (no data read; `build` uses it), for `predict` and export
    build_model: Optional[Callable] = None
    predictor: "object" = None  # rs_transfer.predictor.Predictor: `rs-transfer predict`; None: the task has none
    check_data: Optional[Callable] = None  # check_data(config) -> None: the data.root layout, torch-free

    # What rs_transfer/families.py's TaskDeclaration also says (class constants, the same for every transfer task).
    family = "transfer"
    sample_unit = "images"

    @property
    def metric(self) -> str:
        """The protocol's metric, single-scale whole-image; a run's own primary metric is `metric_of(config.task)`."""
        return self.protocol.metric

    def eval_size(self, config) -> int | None:
        """The side, in pixels, a run of this task is evaluated at (export's default input): the detectors'
        task.det_eval_size, task.image_size for whole-image tasks (the protocol's image_size), else task.crop_size
        (None when the section has none: a plugin's task)."""
        task = config.task
        if hasattr(task, "det_eval_size"):  # the detection tasks' section (pascal_det.DetectorSection)
            return task.det_eval_size
        if self.protocol.image_size is not None:  # whole images at task.image_size (cifar100, folder_cls)
            return task.image_size
        return getattr(task, "crop_size", None)

    def metric_of(self, task_section) -> str:
        """The primary metric of a run whose `task` section is `task_section` (the dataclass, or the dict of its
        config.yaml; None: the defaults): the protocol's metric with the run's inference suffix (`section_suffix`:
        "miou_slide", "ap50_flip")."""
        return self.metric + section_suffix(task_section)



TransferTask = TransferTaskDeclaration  # its former name, which plugins' task modules may still import

def register(name: str, module: str) -> None:
    """Add a task whose module lives outside this package, for this Python process only (a test, a notebook).
    An installed package declares an entry point instead (docs/downstream.md, "Adding a task")."""
    MODULES[name] = module


@functools.cache
def plugins() -> dict:
    """Task name -> EntryPoint, for every installed `rs_transfer.tasks` entry point, sorted by name. Read once per
    process (a scan of the installed distributions' metadata, no import). A name that `MODULES` already has is
    skipped with a warning: a plugin does not replace a task of the package."""
    found = {}
    for point in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda p: p.name):
        if point.name in MODULES:
            log.warning("ignored the %s entry point %s = %s: the package has a task of that name",
                        ENTRY_POINT_GROUP, point.name, point.value)
            continue
        found.setdefault(point.name, point)
    return found


def names() -> tuple:
    """Every task name: the package's in Table 5's order, those added with `register`, then the plugins'."""
    return tuple(MODULES) + tuple(name for name in plugins() if name not in MODULES)


def get(name: str) -> TransferTaskDeclaration:
    """The task's TransferTaskDeclaration, importing its module. Raises UserError for an unknown name (listing the
    known ones) and for a plugin that cannot be used (naming its entry point): its module fails to import, has no
    `TASK`, or declares another name."""
    if name in MODULES:
        module, source = MODULES[name], f"module {MODULES[name]}"
    elif name in plugins():
        point = plugins()[name]
        module, source = point.value, f"the {ENTRY_POINT_GROUP} entry point {name} = {point.value!r}"
        if point.attr:
            raise UserError(f"{source}: the value must be a module path (e.g. my_package.my_task), "
                            "not an object reference with ':'")
    else:
        raise UserError(f"unknown task {name!r}: expected one of {', '.join(names())}")
    task = getattr(_import(module, source), "TASK", None)
    if not isinstance(task, TransferTaskDeclaration):
        raise UserError(f"{source} declares no TASK = TransferTaskDeclaration(...)")
    if task.name != name:
        raise UserError(f"{source} declares task {task.name!r}, registered as {name!r}")
    return task


def _import(module: str, source: str):
    if module.startswith("rs_transfer."):
        return importlib.import_module(module)  # the package's own: an error here is a bug, keep its traceback
    try:
        return importlib.import_module(module)
    except Exception as error:  # anything a plugin's import raises is the plugin's fault, not the user's input
        raise UserError(f"{source} cannot be imported: {type(error).__name__}: {error}") from error
