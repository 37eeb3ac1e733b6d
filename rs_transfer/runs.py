"""A finished run folder as a model to use: which task family wrote it, its config, and its network with the
weights it ended with. `rs-transfer predict` (rs_transfer/predict.py) uses it; so can anything else that needs a
trained model without its training data (exporting, serving).

A run folder (OUTPUT_DIR of any training command, docs/engine.md "Outputs") holds `config.yaml` (the resolved
config) and `weights.pth` (the task model's exported network, engine/task.py: EMA weights when the run used EMA).
"""

import json
from dataclasses import dataclass
from pathlib import Path

from rs_transfer.config import EVAL_KEYS, ConfigError, read_yaml
from rs_transfer.engine.summary import run_family
from rs_transfer.errors import UserError

FAMILIES = ("transfer", "pretrain", "video")


class RunError(UserError):
    """A run folder that cannot be used: missing, without config.yaml or weights.pth, or of an unknown kind."""


def family_parts(family: str, task: str | None) -> tuple:
    """(config schema, build_model(config) -> the task's model, its rs_transfer.predictor.Predictor or None)."""
    if family == "transfer":
        from rs_transfer.downstream import registry

        spec = registry.get(task)
        return spec.config, spec.build_model, spec.predictor
    if family == "pretrain":
        from rs_transfer.pretrain import task as pretrain_task
        from rs_transfer.pretrain.config import PretrainConfig

        return PretrainConfig, pretrain_task.build_model, pretrain_task.PREDICTOR
    if family == "video":
        from rs_transfer.video import task as video_task
        from rs_transfer.video.config import VideoConfig

        return VideoConfig, video_task.build_model, video_task.PREDICTOR
    raise ValueError(f"unknown family {family!r}: expected one of {FAMILIES}")


def family_build(family: str, task: str | None):
    """build(config) -> the family's engine Task (datasets, model, evaluator): what its training command builds,
    so `evaluate` measures exactly what the run measured."""
    if family == "transfer":
        from rs_transfer.downstream import registry

        return registry.get(task).build
    if family == "pretrain":
        from rs_transfer.pretrain.task import build_task

        return build_task
    if family == "video":
        from rs_transfer.video.task import build_task

        return build_task
    raise ValueError(f"unknown family {family!r}: expected one of {FAMILIES}")


@dataclass
class Run:
    folder: Path
    family: str  # one of FAMILIES
    task: str | None  # the transfer task's name; None for pretrain and video
    config: object  # the run's config (the family's schema), model.weights cleared
    model: object  # the task's model (engine/task.py contract) in eval mode, weights.pth loaded strictly


def read_run_config(folder: Path) -> dict:
    """config.yaml of a run folder as a dict. Raises RunError naming the folder or file."""
    if folder.is_file():
        raise RunError(f"{folder} is a file; give the run folder that holds it: {folder.parent}")
    if not folder.is_dir():
        raise RunError(f"run folder not found: {folder}")
    path = folder / "config.yaml"
    if not path.is_file():
        raise RunError(f"{folder} is not a run folder: it has no config.yaml (the OUTPUT_DIR of a training command)")
    try:
        config = read_yaml(path.read_text(encoding="utf-8"), str(path))
    except (OSError, UnicodeDecodeError, ConfigError) as error:
        raise RunError(f"cannot read {path}: {type(error).__name__}: {' '.join(str(error).split())}") from None
    if not isinstance(config, dict):
        raise RunError(f"{path} holds no config (a YAML mapping)")
    return config


MISSING = object()  # a key one of two configs does not have


def config_differences(folder_a, folder_b) -> list:
    """(key, value in A, value in B, kind) for every key whose value differs between the config.yaml of two run
    folders, sorted by key; a key one config lacks has MISSING there. kind, on the logic that refuses a changed
    resume (config.py): "run" (changes what is trained), "evaluation" (EVAL_KEYS), "location" (LOCATION_KEYS: where
    and on what hardware), "from the data" (INFERRED_KEYS). Raises RunError as read_run_config."""
    from rs_transfer.config import INFERRED_KEYS, LOCATION_KEYS, flatten

    a, b = (flatten(read_run_config(Path(folder))) for folder in (folder_a, folder_b))
    rows = []
    for key in sorted(a.keys() | b.keys()):
        old, new = a.get(key, MISSING), b.get(key, MISSING)
        if old == new:
            continue
        kind = ("evaluation" if key in EVAL_KEYS else "location" if key in LOCATION_KEYS
                else "from the data" if key in INFERRED_KEYS else "run")
        rows.append((key, old, new, kind))
    return rows


def format_differences(rows: list, folder_a, folder_b) -> str:
    """config_differences as aligned columns, the keys that change the run first."""
    if not rows:
        return f"{folder_a} and {folder_b} have the same config"

    def shown(value) -> str:
        return "(absent)" if value is MISSING else json.dumps(value)

    order = {"run": 0, "from the data": 1, "evaluation": 2, "location": 3}
    lines = [("key", str(folder_a), str(folder_b), "kind")]
    lines += [(key, shown(old), shown(new), kind) for key, old, new, kind in sorted(rows, key=lambda r: order[r[3]])]
    widths = [min(60, max(len(line[i]) for line in lines)) for i in range(4)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines)


def run_kind(folder: Path) -> tuple:
    """(family, transfer task name or None) of the run in `folder`, from its config.yaml (engine/summary.run_family).
    Raises RunError as read_run_config, and for a config of no known family."""
    family, task = run_family(read_run_config(folder))
    if family == "other":
        raise RunError(f"{folder / 'config.yaml'}: the config has no task.name (transfer), augment/cotrain section "
                       "(pretrain) nor data.clip_frames (video)")
    return family, task


def _eval_overrides(overrides) -> list:
    """`overrides` when each sets a key of config.EVAL_KEYS; ConfigError naming the first that does not."""
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key not in EVAL_KEYS:
            raise ConfigError(f"{item!r}: {key} is not an evaluation setting: a run is used with the config it was "
                              "trained with; only evaluation keys may change "
                              f"({', '.join(sorted(k for k in EVAL_KEYS if k.startswith('task.')))}, ...)")
    return list(overrides)


def load_run(run_dir, device="cpu", overrides=()) -> Run:
    """The run in `run_dir`: its family, config (changed by `overrides`, key=value items of config.EVAL_KEYS: how to
    evaluate, never what was trained) and model (eval mode, on `device`) with weights.pth loaded strictly.

    The model is built from the config alone (`build_model`), so the run's training data need not be there.
    Raises RunError for a missing folder, config.yaml or weights.pth, a config of no known family or a task without
    a build_model; UserError for a transfer task that is not registered or an override of another key;
    ConfigError for a config.yaml that no longer loads; WeightsError for weights.pth that do not fit the model."""
    import torch

    from rs_transfer.config import EVAL_KEYS, load_config
    from rs_transfer.engine.task import exported_network
    from rs_transfer.models.weights import load_strict, read_state_dict

    folder = Path(run_dir)
    config_path = folder / "config.yaml"
    family, task = run_kind(folder)
    weights = folder / "weights.pth"
    if not weights.is_file():
        raise RunError(f"{folder} has no weights.pth: the run has not finished (the engine writes it at the end; "
                       "resume the run with --resume to finish it)")
    schema, build_model, _ = family_parts(family, task)
    if build_model is None:
        raise RunError(f"task {task} declares no build_model (TASK.build_model): its runs cannot be loaded alone")
    config = load_config(schema, config_path, _eval_overrides(overrides))
    # The network comes from weights.pth: the starting weights the run was given (model.weights, a 2D checkpoint
    # to inflate) are neither needed nor read.
    config.model.weights = None
    if hasattr(config.model, "inflate_from"):
        config.model.inflate_from = None
    model = build_model(config)
    load_strict(exported_network(model), read_state_dict(weights), weights, what=f"the {task or family} model of "
                f"{config_path}")
    return Run(folder=folder, family=family, task=task, config=config, model=model.to(torch.device(device)).eval())
