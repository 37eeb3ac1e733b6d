"""A finished run folder as a model to use: which task family wrote it, its config, and its network with the
weights it ended with. `rs-transfer predict` (rs_transfer/predict.py) uses it; so can anything else that needs a
trained model without its training data (exporting, serving).

A run folder (OUTPUT_DIR of any training command, docs/engine.md "Outputs") holds `config.yaml` (the resolved
config) and `weights.pth` (the task model's exported network, engine/task.py: EMA weights when the run used EMA).
"""

from dataclasses import dataclass
from pathlib import Path

from rs_transfer.config import ConfigError, read_yaml
from rs_transfer.engine.summary import run_family
from rs_transfer.errors import UserError

FAMILIES = ("transfer", "pretrain", "video")


class RunError(UserError):
    """A run folder that cannot be used: missing, without config.yaml or weights.pth, or of an unknown kind."""


def family_parts(family: str, task: str | None) -> tuple:
    """(config schema, build_model(config) -> the task's model, its rs_transfer.predict.Predictor or None)."""
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


def load_run(run_dir, device="cpu", overrides=()) -> Run:
    """The run in `run_dir`: its family, config and model (eval mode, on `device`) with weights.pth loaded strictly.
    `overrides`: "key=value" items applied to its config.yaml, evaluation keys only (config.EVAL_KEYS: how it
    predicts, e.g. task.tta=flip; any other key would describe another network than weights.pth).

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
    saved = read_run_config(folder)
    family, task = run_family(saved)
    if family == "other":
        raise RunError(f"{config_path}: the config has no task.name (transfer), augment/cotrain section (pretrain) "
                       "nor data.clip_frames (video)")
    weights = folder / "weights.pth"
    if not weights.is_file():
        raise RunError(f"{folder} has no weights.pth: the run has not finished (the engine writes it at the end; "
                       "resume the run with --resume to finish it)")
    schema, build_model, _ = family_parts(family, task)
    if build_model is None:
        raise RunError(f"task {task} declares no build_model (TASK.build_model): its runs cannot be loaded alone")
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key not in EVAL_KEYS:
            raise UserError(f"{item!r}: a run is used with the config it was trained with; only evaluation keys may "
                            f"change ({', '.join(sorted(EVAL_KEYS))})")
    config = load_config(schema, config_path, overrides)
    # The network comes from weights.pth: the starting weights the run was given (model.weights, a 2D checkpoint
    # to inflate) are neither needed nor read.
    config.model.weights = None
    if hasattr(config.model, "inflate_from"):
        config.model.inflate_from = None
    model = build_model(config)
    load_strict(exported_network(model), read_state_dict(weights), weights, what=f"the {task or family} model of "
                f"{config_path}")
    return Run(folder=folder, family=family, task=task, config=config, model=model.to(torch.device(device)).eval())
