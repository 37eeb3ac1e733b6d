"""Table 5: transfer of one backbone to five tasks (PAPER.md section 5): sweep each checkpoint's LR x steps grid
on every task (rs_transfer/downstream/finetune.py's `sweep`), pick each sweep's best point and write table5.md /
table5.json beside the paper's rows (each task's `TASK.paper`, gathered by `protocol.table5()`). The tasks and
their columns come from the registry (rs_transfer/downstream/registry.py).
"""

import re
from pathlib import Path

from rs_transfer.config import ConfigError, read_yaml, string_override
from rs_transfer.downstream import protocol, registry
from rs_transfer.downstream.finetune import sweep
from rs_transfer.engine.summary import metric_value, read_final_metrics, read_json_object
from rs_transfer.errors import DataError, UserError
from rs_transfer.reproduce.common import write_table


def run_table5(checkpoints: list, data_roots: list, output_dir, overrides=(), results=(), config_path=None,
               learning_rates=None, steps=None) -> dict:
    """Sweep every checkpoint on every task that has a data root, then write Table 5 from them (and `results`).

    checkpoints: "LABEL=BACKBONE:WEIGHTS" items (e.g. "RS-152=rs152:rs152.pth"; no ":WEIGHTS" = random init);
    data_roots: "TASK=DIR" items, one per task to run. Sweeps go to OUTPUT_DIR/runs/<label>/<task>/; finished grid
    points are skipped, so running the same command again resumes.
    """
    roots = {}
    for item in data_roots:
        task, sep, root = item.partition("=")
        if not sep or task not in registry.names() or not root:
            raise UserError(f"bad --data {item!r}: expected TASK=DIR with TASK one of {', '.join(registry.names())}")
        roots[task] = root
    if checkpoints and not roots:
        raise UserError("--checkpoint needs at least one --data TASK=DIR: the tasks to fine-tune on")
    collected = list(results)
    for item in checkpoints:
        label, sep, spec = item.partition("=")
        backbone, _, weights = spec.partition(":")
        if not (sep and label and backbone):
            raise UserError(f"bad --checkpoint {item!r}: expected LABEL=BACKBONE:WEIGHTS, e.g. RS-152=rs152:rs152.pth")
        for task, root in roots.items():
            folder = Path(output_dir) / "runs" / re.sub(r"[^A-Za-z0-9._-]+", "_", label) / task
            sweep(task, backbone, weights or None, config_path, [*overrides, string_override("data.root", root), string_override("output_dir", folder)],
                  learning_rates=learning_rates, steps=steps)
            collected.append(f"{label}:{task}={folder}")
    if not collected:
        raise UserError("nothing to put in Table 5: give --checkpoint with --data, or --result")
    return reproduce_table5(collected, output_dir)


def reproduce_table5(runs: list, output_dir, backbone_row=("R152", "RS")) -> dict:
    """Collect finished runs into table5.md / table5.json beside the paper's numbers.

    runs: "LABEL:TASK=RUN_DIR" items; a RUN_DIR holding sweep.json gives its best point, one holding
    final_metrics.json gives that run. A run evaluated with test-time augmentation (task.tta) is listed under its
    own metric (`ap50_flip`), named in its cell: the paper's numbers are single-scale.
    """
    table, metrics = {}, {}
    for item in runs:
        label, sep, rest = item.partition(":")
        task, sep2, folder = rest.partition("=")
        if not (sep and sep2) or task not in registry.names():
            raise UserError(f"bad --result {item!r}: expected LABEL:TASK=RUN_DIR with TASK one of {', '.join(registry.names())}")
        table.setdefault(label, {})[task], metrics.setdefault(label, {})[task] = _read_result(Path(folder), task)
    columns = protocol.table5_tasks() + tuple(t for t in registry.names() if t not in protocol.table5_tasks()
                                               and any(t in values for values in table.values()))
    rows = [{"label": label, **{t: values.get(t) for t in columns}, "metrics": metrics[label]}
            for label, values in table.items()]
    paper = [{"label": f"paper {b} {m} ({e} ep)", **dict(zip(columns, v))} for (b, m, e), v in protocol.table5().items()]
    header = "| run | " + " | ".join(registry.get(t).protocol.column for t in columns) + " |"
    lines = ["# Table 5: transfer (ours vs the paper)", "", header, "|---" * (len(columns) + 1) + "|"]
    for row in rows + paper:
        cells = ["-" if row.get(t) is None else f"{row[t]:.1f}{_metric_note(row, t)}" for t in columns]
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    write_table(output_dir, "table5", "\n".join(lines) + "\n", {"ours": rows, "paper": paper, "unit": "percent"})
    print("\n".join(lines))
    return {"ours": rows, "paper": paper}


def _metric_note(row: dict, task: str) -> str:
    metric = row.get("metrics", {}).get(task)
    return f" ({metric})" if metric and metric != registry.get(task).metric else ""


def _read_result(folder: Path, task: str) -> tuple:
    """(the run's primary metric in percent, its name): the best point of FOLDER/sweep.json (the metric it names),
    else FOLDER/final_metrics.json (the metric of FOLDER/config.yaml's task section, `TransferTask.metric_of`).
    Raises DataError naming the file when neither is there, or one is unreadable or lacks a numeric metric."""
    sweep_path = folder / "sweep.json"
    summary = read_json_object(sweep_path, "a finished sweep (rs-transfer sweep)")
    if summary is not None:
        best = summary.get("best")
        if not isinstance(best, dict):
            raise DataError(f"{sweep_path} has no 'best' grid point: is it a finished sweep?")
        metric = summary["metric"] if isinstance(summary.get("metric"), str) else registry.get(task).metric
        return 100 * metric_value(best, metric, sweep_path), metric
    metric = _run_metric(folder, task)
    values = read_final_metrics(folder, metric)
    if values is None:
        raise DataError(f"{folder} holds neither sweep.json nor final_metrics.json: expected a finished run")
    return 100 * values[metric], metric


def _run_metric(folder: Path, task: str) -> str:
    """The primary metric of the run in `folder` by its config.yaml (the protocol's when it has none)."""
    path = folder / "config.yaml"
    try:
        config = read_yaml(path.read_text(encoding="utf-8"), str(path)) if path.is_file() else {}
    except (OSError, UnicodeDecodeError, ConfigError) as error:
        raise DataError(f"cannot read {path}: {' '.join(str(error).split())}") from None
    section = config.get("task") if isinstance(config, dict) else None
    return registry.get(task).metric_of(section if isinstance(section, dict) else {})
