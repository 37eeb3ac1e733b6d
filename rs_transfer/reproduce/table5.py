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
from rs_transfer.engine.summary import SUMMARY_FILE, metric_value, read_final_metrics, read_json_object
from rs_transfer.errors import DataError, UserError
from rs_transfer.reproduce.common import write_table


def run_table5(checkpoints: list, data_roots: list, output_dir, overrides=(), results=(), config_path=None,
               learning_rates=None, steps=None, dry_run: bool = False) -> dict:
    """Sweep every checkpoint on every task that has a data root, then write Table 5 from them (and `results`).

    checkpoints: "LABEL=BACKBONE:WEIGHTS" items (e.g. "RS-152=rs152:rs152.pth"; no ":WEIGHTS" = random init);
    data_roots: "TASK=DIR" items, one per task to run. Sweeps go to OUTPUT_DIR/runs/<label>/<task>/; finished grid
    points are skipped, so running the same command again resumes. `dry_run`: print every fine-tuning run the
    command would start (grid point, steps, folder, finished or not) and return {"runs": [...]}; nothing is
    trained or written.
    """
    roots = {}
    for item in data_roots:
        task, sep, root = item.partition("=")
        if not sep or task not in registry.names() or not root:
            raise UserError(f"bad --data {item!r}: expected TASK=DIR with TASK one of {', '.join(registry.names())}")
        roots[task] = root
    if checkpoints and not roots:
        raise UserError("--checkpoint needs at least one --data TASK=DIR: the tasks to fine-tune on")
    collected, planned = list(results), []
    for item in checkpoints:
        label, sep, spec = item.partition("=")
        backbone, _, weights = spec.partition(":")
        if not (sep and label and backbone):
            raise UserError(f"bad --checkpoint {item!r}: expected LABEL=BACKBONE:WEIGHTS, e.g. RS-152=rs152:rs152.pth")
        for task, root in roots.items():
            folder = Path(output_dir) / "runs" / re.sub(r"[^A-Za-z0-9._-]+", "_", label) / task
            if dry_run:
                for lr, length in protocol.grid(task, learning_rates, steps):
                    point = folder / protocol.point_name(lr, length)
                    planned.append({"label": label, "task": task, "backbone": backbone, "weights": weights or None,
                                    "lr": lr, "steps": length, "folder": str(point),
                                    "finished": (point / "final_metrics.json").is_file()})
                continue
            sweep(task, backbone, weights or None, config_path, [*overrides, string_override("data.root", root), string_override("output_dir", folder)],
                  learning_rates=learning_rates, steps=steps)
            collected.append(f"{label}:{task}={folder}")
    if dry_run:
        _print_plan(planned)
        return {"runs": planned}
    if not collected:
        raise UserError("nothing to put in Table 5: give --checkpoint with --data, or --result")
    return reproduce_table5(collected, output_dir)


def _print_plan(planned: list) -> None:
    """`reproduce table5 --dry-run`: one line per fine-tuning run, then the totals."""
    if not planned:
        print("nothing to run: give --checkpoint LABEL=BACKBONE:WEIGHTS with --data TASK=DIR")
        return
    print(f"{'label':<12}{'task':<12}{'backbone':<12}{'lr':>8}{'steps':>8}  status      folder")
    for run in planned:
        status = "finished" if run["finished"] else "to run"
        print(f"{run['label']:<12}{run['task']:<12}{run['backbone']:<12}{run['lr']:>8g}{run['steps']:>8}  "
              f"{status:<10}  {run['folder']}")
    left = [run for run in planned if not run["finished"]]
    print(f"\n{len(planned)} fine-tuning runs, {len(left)} to run ({sum(run['steps'] for run in left)} training steps); "
          "dry run: nothing trained or written")


def reproduce_table5(runs: list, output_dir, backbone_row=("R152", "RS")) -> dict:
    """Collect finished runs into table5.md / table5.json beside the paper's numbers.

    runs: "LABEL:TASK=RUN_DIR" items; a RUN_DIR holding sweep.json gives its best point, one holding
    final_metrics.json gives that run. A run evaluated in windows or with test-time augmentation is read under its
    own metric (`miou_slide`, `ap50_flip`) and named below the table: the paper's numbers are single-scale.
    """
    table, other_metrics = {}, []
    for item in runs:
        label, sep, rest = item.partition(":")
        task, sep2, folder = rest.partition("=")
        if not (sep and sep2) or task not in registry.names():
            raise UserError(f"bad --result {item!r}: expected LABEL:TASK=RUN_DIR with TASK one of {', '.join(registry.names())}")
        value, metric = _read_result(Path(folder), task)
        table.setdefault(label, {})[task] = value
        if metric != registry.get(task).metric:  # sliding-window or TTA: said next to the table, not hidden in it
            other_metrics.append(f"{label} {task}: {metric}")
    columns = protocol.table5_tasks() + tuple(t for t in registry.names() if t not in protocol.table5_tasks()
                                               and any(t in values for values in table.values()))
    rows = [{"label": label, **{t: values.get(t) for t in columns}} for label, values in table.items()]
    paper = [{"label": f"paper {b} {m} ({e} ep)", **dict(zip(columns, v))} for (b, m, e), v in protocol.table5().items()]
    header = "| run | " + " | ".join(registry.get(t).protocol.column for t in columns) + " |"
    lines = ["# Table 5: transfer (ours vs the paper)", "", header, "|---" * (len(columns) + 1) + "|"]
    for row in rows + paper:
        cells = ["-" if row.get(t) is None else f"{row[t]:.1f}" for t in columns]
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    if other_metrics:
        lines += ["", "Not single-scale whole-image (the paper's protocol): " + "; ".join(other_metrics)]
    write_table(output_dir, "table5", "\n".join(lines) + "\n",
                {"ours": rows, "paper": paper, "unit": "percent", "other_metrics": other_metrics})
    print("\n".join(lines))
    return {"ours": rows, "paper": paper}


def _read_result(folder: Path, task: str) -> tuple:
    """(the task's metric in percent, its name): the best point of FOLDER/sweep.json, else FOLDER/final_metrics.json;
    the name is the one the sweep or run recorded (sweep.json's, summary.json's "metric": "miou_slide" for a run
    evaluated in windows), else the task's default. Raises DataError naming the file when neither is there, or one
    is unreadable or lacks a numeric metric."""
    sweep_path = folder / "sweep.json"
    summary = read_json_object(sweep_path, "a finished sweep (rs-transfer sweep)")
    if summary is not None:
        best = summary.get("best")
        if not isinstance(best, dict):
            raise DataError(f"{sweep_path} has no 'best' grid point: is it a finished sweep?")
        metric = _recorded_metric(summary, task)
        return 100 * metric_value(best, metric, sweep_path), metric
    recorded = read_json_object(folder / SUMMARY_FILE, "a finished run's summary")
    metric = _recorded_metric(recorded, task) if recorded else _run_metric(folder, task)
    values = read_final_metrics(folder, metric)
    if values is None:
        raise DataError(f"{folder} holds neither sweep.json nor final_metrics.json: expected a finished run")
    return 100 * values[metric], metric


def _run_metric(folder: Path, task: str) -> str:
    """The primary metric of the run in `folder` by its config.yaml's task section (a run collected without its
    summary.json; the protocol's metric when it has no config.yaml)."""
    path = folder / "config.yaml"
    try:
        config = read_yaml(path.read_text(encoding="utf-8"), str(path)) if path.is_file() else {}
    except (OSError, UnicodeDecodeError, ConfigError) as error:
        raise DataError(f"cannot read {path}: {' '.join(str(error).split())}") from None
    section = config.get("task") if isinstance(config, dict) else None
    return registry.get(task).metric_of(section if isinstance(section, dict) else None)


def _recorded_metric(record: dict, task: str) -> str:
    """The metric a sweep.json or summary.json names when it is one of the task's (its default name, possibly with
    an inference suffix: "miou_slide"), else the task's default."""
    default = registry.get(task).metric
    metric = record.get("metric")
    return metric if isinstance(metric, str) and metric.startswith(default) else default
