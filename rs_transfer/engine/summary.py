"""What a person reads about runs: the end-of-run summary (OUTPUT_DIR/summary.json and a table in the log) and
`rs-transfer runs DIR`, one row per run folder under DIR.

Imports no torch (the trainer builds the summary from plain numbers), so listing a folder of runs is fast. The
only exception is a run finished before summary.json existed, with a transfer task: its primary metric's name comes
from the task registry, which imports the task's module.
"""

import math
import os
from pathlib import Path

import yaml

from rs_transfer.config import ConfigError, read_yaml
from rs_transfer.errors import DataError, UserError, one_line
from rs_transfer.files import atomic_write_json, read_json

SUMMARY_FILE = "summary.json"
FINAL_METRICS_FILE = "final_metrics.json"
# The run folder's outputs, as summary.json lists them (relative to the folder).
OUTPUTS = {
    "final_metrics": FINAL_METRICS_FILE,
    "weights": "weights.pth",
    "final": "final.pt",
    "best": "checkpoints/best.pt",
    "metrics": "metrics.jsonl",
    "tensorboard": "tensorboard",
}
SORTS = ("metric", "time", "name")
STEP_FILE_PREFIX, STEP_FILE_SUFFIX = "step_", ".pt"  # checkpoint.py's step_00001234.pt, matched without torch


def run_summary(out: Path, metric: str, metrics: dict, best: float, best_step: int | None, steps: int,
                batch_size: int, wall_s: float, train_s: float) -> dict:
    """The content of summary.json.

    Args: the run folder; the primary metric's name and the final evaluation (`metrics[metric]` is reported); the
    best value of the metric over the run's evaluations and its step (None when the run resumed from a checkpoint
    written before best steps were recorded); optimizer steps and the global batch; seconds of the whole run and
    of training alone (no evaluations or checkpoint writes), both summed over resumed segments.
    images_per_s = steps x batch_size / train_s: the run's mean training throughput.
    """
    return {
        "metric": metric,
        "value": metrics[metric],
        "best_value": best,
        "best_step": best_step,
        "steps": steps,
        "batch_size": batch_size,
        "wall_s": round(wall_s, 3),
        "train_s": round(train_s, 3),
        "images_per_s": round(steps * batch_size / train_s, 2) if train_s > 0 else None,
        "output_dir": str(out.resolve()),
        "outputs": OUTPUTS,
    }


def write_summary(out: Path, summary: dict) -> Path:
    """OUTPUT_DIR/summary.json, written atomically (rank 0)."""
    return atomic_write_json(out / SUMMARY_FILE, summary)


# What one training sample is, per config family (run_family), for the throughput row; summary.json keeps the key
# images_per_s for every family so readers of it need not know the family.
SAMPLE_UNITS = {"video": "clips"}


def format_summary(summary: dict, family: str | None = None) -> str:
    """The end-of-run table: one aligned `name  value` row per line; the throughput row is labelled by what a
    sample of `family` is (clips/s for video, else images/s)."""
    best = (f"{summary['best_value']:.4f} at step {summary['best_step']}" if summary["best_step"] is not None
            else f"{summary['best_value']:.4f}")
    speed = summary["images_per_s"]
    out = summary["output_dir"]
    rows = [
        ("metric", f"{summary['metric']} = {summary['value']:.4f} (final evaluation)"),
        ("best", f"{best} (checkpoints/best.pt)"),
        ("steps", f"{summary['steps']} x batch {summary['batch_size']}"),
        ("wall time", f"{format_seconds(summary['wall_s'])} (training {format_seconds(summary['train_s'])}, "
                      "the rest evaluations and checkpoints)"),
        (f"{SAMPLE_UNITS.get(family, 'images')}/s", f"{speed:.1f} (training, mean over the run)" if speed is not None else "-"),
        ("outputs", out),
        ("", ", ".join(OUTPUTS.values()) + f", {SUMMARY_FILE}"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"  {name:<{width}}  {value}" for name, value in rows)


def format_seconds(seconds: float | None) -> str:
    """"12.3 s" under a minute, else H:MM:SS; "-" for None."""
    if seconds is None:
        return "-"
    if seconds < 59.95:
        return f"{seconds:.1f} s"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def run_family(config: dict) -> tuple[str, str | None]:
    """(family, transfer task name) of a run from its config.yaml as a dict.

    family: "transfer" (the config has `task.name`; the name is returned), "pretrain" (it has an `augment` or
    `cotrain` section), "video" (it has `data.clip_frames`), or "other" (none of these: e.g. a bare engine run);
    the name is None for every family but "transfer".
    """
    task = config.get("task")
    if isinstance(task, dict) and task.get("name"):
        return "transfer", task["name"]
    if "augment" in config or "cotrain" in config:
        return "pretrain", None
    if isinstance(config.get("data"), dict) and "clip_frames" in config["data"]:
        return "video", None
    return "other", None


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
        family, task = run_family(config)
        row["family"], row["task"] = family, _text_or_none(task)
        model = config.get("model")
        row["backbone"] = _text_or_none(model.get("name")) if isinstance(model, dict) else None
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
        row.update(finished=True, metric=_text_or_none(summary.get("metric")),
                   value=_number_or_none(summary.get("value")), wall_s=_number_or_none(summary.get("wall_s")),
                   step=steps if isinstance(steps, int) and not isinstance(steps, bool) else None)
    elif final is not None:
        row["finished"] = True
        section = config.get("task") if isinstance(config, dict) else None
        row["metric"] = primary_metric(row["family"], row["task"], section if isinstance(section, dict) else None)
        row["value"] = _number_or_none(final.get(row["metric"]))
    else:
        row["step"] = last_checkpoint_step(folder / "checkpoints")
    return row


def read_final_metrics(folder: str | Path, metric: str | None = None) -> dict | None:
    """The final evaluation a run wrote, FOLDER/final_metrics.json ({metric name: number, ...}), or None when the
    run has not written it (unfinished, or not a run folder). The one reader of the file: reproduce's tables, sweep
    and `rs-transfer runs` all use it.

    With `metric`, that value is checked to be there and a finite number. Raises DataError naming the file when it
    cannot be read, is not JSON, is not a JSON object, or (with `metric`) lacks the metric or holds a non-number.
    """
    path = Path(folder) / FINAL_METRICS_FILE
    values = read_json_object(path, "the final evaluation of a run")
    if values is not None and metric is not None:
        metric_value(values, metric, path)
    return values


def read_json_object(path: Path, what: str) -> dict | None:
    """The JSON object (dict) in `path`, or None when there is no file; DataError naming the file and `what` it
    should hold when it cannot be read or holds anything else (a run killed by an old writer, a hand edit)."""
    if not path.is_file():
        return None
    values = read_json(path, what)
    if not isinstance(values, dict):
        raise DataError(f"{path} holds a JSON {type(values).__name__}, not an object: it should hold {what}")
    return values


def metric_value(values: dict, metric: str, path: Path) -> float | int:
    """`values[metric]`, a number; DataError naming `path` (the file `values` came from) when it is missing or not
    a finite number."""
    if metric not in values:
        raise DataError(f"{path} has no {metric!r} (it holds {', '.join(map(repr, values)) or 'nothing'}): is it a "
                        "run of this task?")
    value = _number_or_none(values[metric])
    if value is None:
        raise DataError(f"{path}: {metric} = {values[metric]!r} is not a number")
    return value


def _number_or_none(value) -> float | int | None:
    """`value` when it is a finite int or float; None for anything else (a string, a bool, NaN that another tool
    wrote), so that sorting and formatting never meet a non-number."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return value
    return None


def _text_or_none(value) -> str | None:
    """`value` when it is a string; None for anything else (a list or number in a hand-edited file)."""
    return value if isinstance(value, str) else None


def primary_metric(family: str | None, task: str | None, section: dict | None = None) -> str | None:
    """The key in final_metrics.json that a run of this family and task is judged by (runs without summary.json);
    `section`, the run's task section from config.yaml, names a transfer task's variant ("miou_slide")."""
    if family in ("pretrain", "video"):
        return "top1"
    if family == "transfer":
        from rs_transfer.downstream import registry  # imports torch: only for transfer runs without summary.json

        try:
            return registry.get(task).metric_of(section)
        except UserError:  # a task registered by a plugin that is not loaded here
            return None
    return None


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
