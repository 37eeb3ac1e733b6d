"""The main jobs as Python calls, for notebooks and scripts: what the `rs-transfer` commands do, returning results.

    from rs_transfer import api
    metrics = api.finetune("folder_cls", config="downstream/folder_cls_demo.yaml", synthetic=True,
                           output_dir="runs/try", overrides={"train.steps": 20})
    record = api.evaluate("runs/try", overrides={"task.eval_batch_size": 1})

Overrides are a dict ({"train.lr": 0.1}) or the command line's "key=value" strings; strings in a dict are taken as
the strings they are (a path with ':' or '{'), other values as YAML. Errors are the commands' own: ConfigError,
DataError, WeightsError, ... (all UserError, one line each). Progress shows in a notebook: the `rs_transfer` logger
gets a handler printing INFO lines when nothing else has configured logging (the commands' log lines).
"""

import json
import logging
import sys

from rs_transfer.config import string_override


def overrides_list(overrides) -> list:
    """{"train.lr": 0.1, "data.root": "/d"} or ["train.lr=0.1", ...] -> the command line's "key=value" strings."""
    if overrides is None:
        return []
    if isinstance(overrides, dict):
        return [string_override(key, value) if isinstance(value, str) else f"{key}={json.dumps(value)}"
                for key, value in overrides.items()]
    return list(overrides)


def show_progress() -> None:
    """Make the commands' INFO lines (start block, progress, evaluations) visible where nothing configured logging,
    as in a fresh notebook; a program that configured logging keeps its own."""
    logger = logging.getLogger("rs_transfer")
    if not logging.getLogger().handlers and not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def finetune(task: str, backbone: str | None = None, weights: str | None = None, config: str | None = None,
             overrides=None, synthetic: bool = False, output_dir: str | None = None, data: str | None = None) -> dict:
    """Fine-tune `backbone` (a zoo name; default: the config's) from `weights` on transfer task `task`, as
    `rs-transfer finetune`; returns the final metrics (also OUTPUT_DIR/final_metrics.json). config: a YAML file or a
    packaged config's name (default downstream/<task>.yaml); data: data.root; synthetic: generate a tiny dataset in
    the task's layout first (in data.root, or OUTPUT_DIR/synthetic_data)."""
    from rs_transfer.downstream.finetune import make_config, run

    show_progress()
    extra = [string_override(key, value) for key, value in (("output_dir", output_dir), ("data.root", data))
             if value is not None]
    return run(make_config(task, backbone, weights, config, [*overrides_list(overrides), *extra]), synthetic=synthetic)


def evaluate(run_dir: str, overrides=None, data: str | None = None, checkpoint: str | None = None,
             out: str | None = None) -> dict:
    """Evaluate a finished run again, as `rs-transfer evaluate` (evaluation keys only in `overrides`); returns the
    record written to RUN/eval/ (or `out`): {"metrics", "settings", "weights", ...}."""
    from rs_transfer.evaluate import evaluate_run

    show_progress()
    return evaluate_run(run_dir, overrides_list(overrides), data, checkpoint, out)["record"]


def predict(run_dir: str, images, out: str, device: str = "auto", overrides=None) -> dict:
    """A finished run's model on `images` (files or folders), as `rs-transfer predict`; returns what
    OUT/predictions.json holds: {"predictions": one record per input, "skipped", ...}."""
    from rs_transfer.predict import predict as predict_run

    show_progress()
    sources = [images] if isinstance(images, str) else list(images)
    return predict_run(run_dir, sources, out, device, overrides_list(overrides))


def pretrain(config: str, overrides=None, synthetic: bool = False) -> dict:
    """Pretrain a classifier with the RS recipe, as `rs-transfer pretrain --config CONFIG`; returns the final
    metrics."""
    from rs_transfer.pretrain.run import pretrain as pretrain_run

    show_progress()
    return pretrain_run(config, overrides_list(overrides), synthetic=synthetic)


def video_train(config: str, overrides=None) -> dict:
    """Train a 3D model, as `rs-transfer video train --config CONFIG`; returns the final metrics."""
    from rs_transfer.video.run import run_train

    show_progress()
    return run_train(config, overrides_list(overrides))
