"""The `video train` and `video eval` commands, called by video/commands.py (and by `reproduce table6`)."""

import json
import logging
from pathlib import Path

from rs_transfer.config import ConfigError, load_config
from rs_transfer.errors import UserError, one_line
from rs_transfer.files import FileWriteError, atomic_write_json, make_dir
from rs_transfer.video.config import VideoConfig

log = logging.getLogger(__name__)


def run_train(config_path: str, overrides: list) -> dict:
    """Train the config at `config_path` with `overrides`; returns the final metrics. The config, the model name and
    the weights files are checked before torch is imported (~5-30 s), so a typo is answered at once."""
    config = load_config(VideoConfig, config_path, overrides)
    check_model(config)
    from rs_transfer import families
    from rs_transfer.engine.distributed import seed_everything
    from rs_transfer.engine.trainer import train
    from rs_transfer.video.task import TASK, prepare_root

    prepare_root(config)
    seed_everything(config.seed)  # before the model and anything else random is built: same seed, same run
    # build_task fills in an unset model.num_classes, before train() saves the run's config.yaml.
    return train(config, families.build(TASK, config))  # the engine logs the summary; the command prints the JSON once


def check_model(config: VideoConfig) -> None:
    """Torch-free: the 2D zoo name the 3D model is built from (UserError), model.weights and model.inflate_from
    (WeightsError: missing, not cached, or not a checkpoint)."""
    from rs_transfer.models import check_weights, parse_name

    parse_name(config.model.name)
    check_weights(config.model.weights)
    check_weights(config.model.inflate_from)


def find_run_config(checkpoint: Path) -> Path:
    for folder in (checkpoint.parent, checkpoint.parent.parent):
        if (folder / "config.yaml").is_file():
            return folder / "config.yaml"
    raise ConfigError(f"no config.yaml beside {checkpoint} or in its parent folder: give --config FILE")


def check_video_config(path: Path) -> None:
    """Raises UserError when the config at `path` is another family's run (a transfer or pretraining run's
    config.yaml, found beside its checkpoint): load_config would only say that one of its keys is unknown, which
    points at a typo rather than at the wrong command. Configs of no known family (partial files) pass."""
    from rs_transfer.config import read_yaml
    from rs_transfer.families import family_of_config

    try:
        config = read_yaml(path.read_text(encoding="utf-8"), str(path))
    except (OSError, UnicodeDecodeError, ConfigError):
        return  # load_config reports it, naming the file
    family, task = family_of_config(config) if isinstance(config, dict) else ("other", None)
    if family not in ("video", "other"):
        hint = f": evaluate the run with rs-transfer evaluate --run {path.parent}" if path.name == "config.yaml" else ""
        raise UserError(f"{path} is a {family} config{f' ({task})' if task else ''}, not a video one{hint}")


def run_eval(checkpoint: str, views: int, config_path: str | None, overrides: list) -> dict:
    """Evaluate a `video train` checkpoint (weights.pth, final.pt or checkpoints/*.pt) on the validation split; the
    model comes from the run's config.

    Returns the metrics, also logged and written to OUTPUT_DIR/eval_{views}views.json. Raises FileWriteError (one
    line naming the folder or file and the OS's reason) when output_dir cannot be written.
    """
    from rs_transfer.engine.classification import Classifier
    from rs_transfer.engine.distributed import init_distributed, is_main
    from rs_transfer.video.task import build_net, evaluate_videos, list_data, prepare_root, resolve_classes

    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise UserError(f"checkpoint not found: {checkpoint}")
    config_path = Path(config_path) if config_path else find_run_config(checkpoint)
    check_video_config(config_path)
    config = load_config(VideoConfig, config_path, [f"data.eval_views={views}", *overrides])
    config.model.inflate_from = None
    config.model.weights = str(checkpoint)
    info = init_distributed(config.train.device)
    root = prepare_root(config)
    videos, classes = list_data(config, root, ("val",))
    val_videos = videos["val"]
    resolve_classes(config, classes, root)
    model = Classifier(build_net(config)).to(info.device).eval()
    if config.data.max_eval_videos is not None:
        val_videos = val_videos[: config.data.max_eval_videos]
    metrics = {"views": views, "checkpoint": str(checkpoint),
               **evaluate_videos(model, val_videos, config.data, config.model.num_classes)}
    if is_main():
        try:
            out = make_dir(config.output_dir, "output_dir")
            atomic_write_json(out / f"eval_{views}views.json", metrics)
        except FileWriteError as error:  # an evaluation that took hours is not lost with its file: it is in the message
            raise FileWriteError(f"{one_line(error)}; the metrics: {json.dumps(metrics)}") from None
    return metrics  # the command prints them once
