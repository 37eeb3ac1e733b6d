"""Run folders: `rs-transfer runs DIR` (one row per run folder under DIR, `find_runs`; `--diff` of two configs) and
a finished run folder as a model to use (`load_run`: which family wrote it, its config, and its network with the
weights it ended with). `rs-transfer predict`, `evaluate` and `export` use it; so can anything else that needs a
trained model without its training data (serving). Listing imports no torch, except for a run finished before
summary.json existed: its primary metric's name comes from its family's declaration (rs_transfer/families.py).

A run folder (OUTPUT_DIR of any training command, docs/engine.md "Outputs") holds `config.yaml` (the resolved
config) and `weights.pth` (the task model's exported network, engine/task.py: EMA weights when the run used EMA).
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from rs_transfer import families
from rs_transfer.config import EVAL_KEYS, ConfigError, read_yaml
from rs_transfer.engine.summary import (SUMMARY_FILE, format_seconds, number_or_none, read_final_metrics,
                                        read_json_object, text_or_none)
from rs_transfer.errors import DataError, UserError, one_line
from rs_transfer.families import family_of_config, primary_metric

SORTS = ("metric", "time", "name")
STEP_FILE_PREFIX, STEP_FILE_SUFFIX = "step_", ".pt"  # checkpoint.py's step_00001234.pt, matched without torch


class RunError(UserError):
    """A run folder that cannot be used: missing, without config.yaml or weights.pth, or of an unknown kind."""


@dataclass
class Run:
    folder: Path
    family: str  # a family of rs_transfer/families.py
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
    """(family, transfer task name or None) of the run in `folder`, from its config.yaml (families.family_of_config).
    Raises RunError as read_run_config, and for a config of no known family."""
    family, task = family_of_config(read_run_config(folder))
    if family == "other":
        raise RunError(f"{folder / 'config.yaml'}: the config has none of the keys that mark a run family: "
                       f"{families.describe_markers()}")
    return family, task


def finished_run(folder: Path) -> tuple:
    """run_kind of a run that has its weights.pth. Torch-free: `predict` with a wrong folder is answered before torch
    is imported (it took 15 s on a loaded machine). Raises RunError as run_kind, and when weights.pth is missing."""
    family, task = run_kind(folder)
    if not (folder / "weights.pth").is_file():
        raise RunError(f"{folder} has no weights.pth: the run has not finished (the engine writes it at the end; "
                       "resume the run with --resume to finish it)")
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
    family, task = finished_run(folder)
    weights = folder / "weights.pth"
    declared = families.declaration(family, task)
    if declared.build_model is None:
        raise RunError(f"task {task} declares no build_model (TASK.build_model): its runs cannot be loaded alone")
    config = load_config(declared.config, config_path, _eval_overrides(overrides))
    # The network comes from weights.pth: the starting weights the run was given (model.weights, a 2D checkpoint
    # to inflate) are neither needed nor read.
    config.model.weights = None
    if hasattr(config.model, "inflate_from"):
        config.model.inflate_from = None
    model = declared.build_model(config)
    load_strict(exported_network(model), read_state_dict(weights), weights, what=f"the {task or family} model of "
                f"{config_path}")
    return Run(folder=folder, family=family, task=task, config=config, model=model.to(torch.device(device)).eval())


def find_runs(root: str | Path) -> list[dict]:
    """One row per run folder under `root` (recursive; a run folder holds config.yaml; its subfolders are not
    searched). Row keys: folder (relative to root, "." for root itself), family, task, backbone, metric, value,
    wall_s, finished, step (the newest checkpoint's step of an unfinished run), problem (why the row is
    incomplete, or None).

    Raises UserError when `root` is not a folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root} is not a folder: give the folder that holds the runs (their output_dir)")
    rows = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if "meta.yaml" in files:  # MLflow's file store (./mlruns): each run's artifacts hold a copy of its config.yaml
            dirs[:] = []
            continue
        if "config.yaml" in files:
            dirs[:] = []  # runs do not nest; this skips checkpoints/, tensorboard/ and generated data
            rows.append(read_run(Path(folder), root))
    return rows


def read_run(folder: Path, root: Path) -> dict:
    """The row of one run folder (see find_runs); a file that cannot be read leaves its fields None."""
    row = {"folder": str(folder.relative_to(root)), "family": None, "task": None, "backbone": None, "metric": None,
           "value": None, "wall_s": None, "finished": False, "step": None, "problem": None}
    config = _read(folder / "config.yaml", lambda text: read_yaml(text, str(folder / "config.yaml")), row)
    if isinstance(config, dict):
        family, task = family_of_config(config)
        row["family"], row["task"] = family, text_or_none(task)
        model = config.get("model")
        row["backbone"] = text_or_none(model.get("name")) if isinstance(model, dict) else None
    try:
        summary = read_json_object(folder / SUMMARY_FILE, "the summary of a finished run")
    except DataError as error:
        summary, row["problem"] = None, one_line(error)
    try:
        final = read_final_metrics(folder)
    except DataError as error:
        final, row["problem"] = None, one_line(error)
    if summary is not None:  # each field checked: a hand-edited file gives "-" cells, never a failed listing
        steps = summary.get("steps")
        row.update(finished=True, metric=text_or_none(summary.get("metric")),
                   value=number_or_none(summary.get("value")), wall_s=number_or_none(summary.get("wall_s")),
                   step=steps if isinstance(steps, int) and not isinstance(steps, bool) else None)
    elif final is not None:
        row["finished"] = True
        section = config.get("task") if isinstance(config, dict) else None
        row["metric"] = primary_metric(row["family"], row["task"], section if isinstance(section, dict) else None)
        row["value"] = number_or_none(final.get(row["metric"]))
    else:
        row["step"] = last_checkpoint_step(folder / "checkpoints")
    return row


def last_checkpoint_step(folder: Path) -> int | None:
    """The step of the newest step_XXXXXXXX.pt in `folder`, or None when there is none."""
    steps = []
    if folder.is_dir():
        for path in folder.iterdir():
            digits = path.name.removeprefix(STEP_FILE_PREFIX).removesuffix(STEP_FILE_SUFFIX)
            if path.name.startswith(STEP_FILE_PREFIX) and path.name.endswith(STEP_FILE_SUFFIX) and digits.isdigit():
                steps.append(int(digits))
    return max(steps, default=None)


def sort_runs(rows: list[dict], by: str = "metric") -> list[dict]:
    """Rows sorted by metric value, wall time (longest first; runs without one last) or folder name.

    By metric: runs of one family/task and metric together (an mIoU is not ranked against a top-1, nor ImageNet's
    top-1 against Kinetics'), the groups by name, each highest first with its runs without a value last.
    Raises UserError for another `by`."""
    if by == "name":
        return sorted(rows, key=lambda row: row["folder"])
    if by not in SORTS:
        raise UserError(f"--sort {by}: expected one of {', '.join(SORTS)}")
    by_name = sorted(rows, key=lambda row: row["folder"])
    if by == "time":
        return sorted(by_name, key=lambda row: (row["wall_s"] is None, -(row["wall_s"] or 0.0)))
    return sorted(by_name, key=lambda row: (row["metric"] is None, row["family"] or "", row["task"] or "",
                                            row["metric"] or "", row["value"] is None, -(row["value"] or 0.0)))


def format_runs(rows: list[dict]) -> str:
    """Aligned plain-text columns, one line per run; "-" where a value is unknown."""
    header = ("folder", "family/task", "backbone", "metric", "value", "wall time", "status")
    lines = [header]
    for row in rows:
        family = f"{row['family']}/{row['task']}" if row["task"] else (row["family"] or "-")
        value = f"{row['value']:.4f}" if isinstance(row["value"], (int, float)) else "-"
        status = "finished" if row["finished"] else (
            f"unfinished (step {row['step']})" if row["step"] is not None else "unfinished (no checkpoint)")
        if row["problem"]:
            status += f"; {row['problem']}"
        lines.append((row["folder"], family, row["backbone"] or "-", row["metric"] or "-", value,
                      format_seconds(row["wall_s"]), status))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines)


def _read(path: Path, parse, row: dict):
    """`parse(path's text)`, or None when the file is absent; an unreadable one is noted in row["problem"]."""
    if not path.is_file():
        return None
    try:
        return parse(path.read_text())
    except (OSError, ValueError, yaml.YAMLError, ConfigError) as error:
        row["problem"] = f"{path.name} unreadable ({type(error).__name__})"
        return None
