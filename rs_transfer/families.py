"""The run families, declared in one place: pretraining, video and the transfer tasks (and whatever comes next).

A family is a package whose task module declares `TASK` (a `TaskDeclaration`; the transfer family has one module per
task, each declaring a `downstream.registry.TransferTaskDeclaration`, which offers the same attributes). A declaration
says what every command needs of a run of that task without knowing its family: its config schema, how to build its
engine Task (datasets, model, evaluator) and its model alone from a config, its Predictor, its primary metric and what
one training sample is (images, clips). `runs`, `predict`, `evaluate`, `export` and the run listing read it; the
engine receives a built Task and never imports a family.

Which family wrote a run folder is read from its config.yaml by the keys each family's configs alone have
(`markers`), declared here rather than worked out in the engine. A new family is one module declaring `TASK` and
one `Family` line in FAMILIES (or `register(family)` from outside the package: a test, a notebook; docs/layout.md,
"Adding things"). Importing this module imports no torch.
"""

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Callable, Optional

from rs_transfer.errors import UserError


@dataclass(frozen=True)
class TaskDeclaration:
    """What a family declares of its task (pretrain/task.py's and video/task.py's `TASK`).

    config: the run config dataclass; build(config) -> the engine's Task; build_model(config) -> the task's model
    alone, no data read (predict, export, evaluate); predictor: rs_transfer.predictor.Predictor or None; metric:
    the primary metric's key in final_metrics.json; sample_unit: what one training sample is, for throughput
    ("images", "clips"); eval_size(config) -> the side, in pixels, of what the model is evaluated on (export's
    default input), or None when the config does not say."""

    name: str
    family: str
    config: type
    build: Callable
    build_model: Optional[Callable]
    predictor: object
    metric: str
    sample_unit: str = "images"
    eval_size: Callable = lambda config: None

    def metric_of(self, task_section=None) -> str:
        """The primary metric of a run (the same for every run of a family with one task)."""
        return self.metric


@dataclass(frozen=True)
class Family:
    name: str
    markers: tuple  # dotted config keys only this family's configs have: a run folder's family from its config.yaml
    module: Optional[str] = None  # the module declaring the family's one TASK; None: tasks by name (the registry)

    def marks(self, config: dict) -> bool:
        return any(_has_key(config, key) for key in self.markers)


FAMILIES = [
    Family("transfer", ("task.name",)),
    Family("pretrain", ("augment", "cotrain"), "rs_transfer.pretrain.task"),
    Family("video", ("data.clip_frames",), "rs_transfer.video.task"),
]


def register(family: Family) -> None:
    """Add a run family for this Python process (a test, a notebook), after the package's own: a config that an
    earlier family's markers match stays that family's. Raises UserError for a name already registered."""
    if any(known.name == family.name for known in FAMILIES):
        raise UserError(f"run family {family.name!r} is already registered")
    FAMILIES.append(family)


def describe_markers() -> str:
    """The keys that mark each family's configs, for a message: "task.name (transfer), augment or cotrain
    (pretrain), ..."."""
    return ", ".join(f"{' or '.join(family.markers)} ({family.name})" for family in FAMILIES)


def _has_key(config: dict, dotted: str) -> bool:
    value = config
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return False
        value = value[part]
    return dotted != "task.name" or bool(value)  # a transfer config names its task


def family_of_config(config: dict) -> tuple:
    """(family, transfer task name or None) of a run from its config.yaml as a dict: the first family whose
    markers the config has; ("other", None) for none (e.g. a bare engine run)."""
    for family in FAMILIES:
        if family.marks(config):
            return family.name, (config["task"]["name"] if family.module is None else None)
    return "other", None


def get(name: str) -> Family:
    """The family called `name`. Raises UserError for another name."""
    for family in FAMILIES:
        if family.name == name:
            return family
    raise UserError(f"unknown run family {name!r}: expected one of {', '.join(f.name for f in FAMILIES)}")


def declaration(family: str, task: str | None = None):
    """The TASK of `family` (its task `task` for the transfer family), importing its module. Raises UserError for
    an unknown family or task."""
    found = get(family)
    if found.module is None:
        from rs_transfer.downstream import registry

        return registry.get(task)
    return importlib.import_module(found.module).TASK


def primary_metric(family: str | None, task: str | None, section: dict | None = None) -> str | None:
    """The key in final_metrics.json that a run of this family and task is judged by, for runs without
    summary.json; `section`, the run's task section from config.yaml, names a transfer task's variant
    ("miou_slide"). None for an unknown family or a task registered by a plugin that is not installed here."""
    try:
        return declaration(family, task).metric_of(section)
    except UserError:
        return None


def build(declared, config):
    """declared.build(config): the engine Task, labelled with its family, task name and sample unit (what
    summary.json and the logs say of the run)."""
    task = declared.build(config)
    return dataclasses.replace(task, family=declared.family, name=declared.name, sample_unit=declared.sample_unit)
