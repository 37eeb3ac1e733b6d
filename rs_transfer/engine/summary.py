"""What a person reads at the end of a run: OUTPUT_DIR/summary.json and the same numbers as a table in the log, and
the one reader of final_metrics.json. `rs-transfer runs DIR` (one row per run folder) is rs_transfer/runs.py.

Imports no torch (the trainer builds the summary from plain numbers) and no family.
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


def run_summary(out: Path, metric: str, metrics: dict, best: float, best_step: int | None, steps: int,
                batch_size: int, wall_s: float, train_s: float, family: str | None = None,
                task: str | None = None) -> dict:
    """The content of summary.json.

    Args: the run folder; the primary metric's name and the final evaluation (`metrics[metric]` is reported); the
    best value of the metric over the run's evaluations and its step (None when the run resumed from a checkpoint
    written before best steps were recorded); optimizer steps and the global batch; seconds of the whole run and
    of training alone (no evaluations or checkpoint writes), both summed over resumed segments.
    images_per_s = steps x batch_size / train_s: the run's mean training throughput (of clips, for video);
    family and task: the labels the run's family gave its Task (rs_transfer/families.py), None for a bare engine run.
    """
    return {
        "family": family,
        "task": task,
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


def format_summary(summary: dict, sample_unit: str = "images") -> str:
    """The end-of-run table: one aligned `name  value` row per line; the throughput row is labelled by what a
    training sample is (`sample_unit`: clips/s for video). summary.json keeps the key images_per_s for every family
    so readers of it need not know the family."""
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
        (f"{sample_unit}/s", f"{speed:.1f} (training, mean over the run)" if speed is not None else "-"),
        ("outputs", out),
        ("", ", ".join(OUTPUTS.values()) + f", {SUMMARY_FILE}"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"  {name:<{width}}  {value}" for name, value in rows)


def format_count(value: float) -> str:
    """A count for people: 10000 epochs, not '1e+04' (the `g` format); 66.67, 4; under 1, three significant digits
    (0.0012 epochs of a short try on a large set)."""
    return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}".rstrip("0").rstrip(".")


def format_seconds(seconds: float | None) -> str:
    """"12.3 s" under a minute, else H:MM:SS; "-" for None."""
    if seconds is None:
        return "-"
    if seconds < 59.95:
        return f"{seconds:.1f} s"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


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
    value = number_or_none(values[metric])
    if value is None:
        raise DataError(f"{path}: {metric} = {values[metric]!r} is not a number")
    return value


def number_or_none(value) -> float | int | None:
    """`value` when it is a finite int or float; None for anything else (a string, a bool, NaN that another tool
    wrote), so that sorting and formatting never meet a non-number."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return value
    return None


def text_or_none(value) -> str | None:
    """`value` when it is a string; None for anything else (a list or number in a hand-edited file)."""
    return value if isinstance(value, str) else None
