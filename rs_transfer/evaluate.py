"""`rs-transfer evaluate`: a finished run's network evaluated again, on its validation data or on another folder in
the same layout, with its evaluation settings (config.EVAL_KEYS) changed or not; the metrics and every setting used
go to a new JSON file (RUN/eval/<UTC time>-<settings hash>.json or --out), never to the run's final_metrics.json.

Every family (pretraining, the transfer tasks, video) goes the same way: the run's config.yaml with the overrides,
the family's own build (the Task its training command built: datasets, model, evaluator), the run's weights loaded
strictly into the model's exported network (`model.net`, engine/task.py), and the Task's evaluator called as the
engine calls it at the end of a run (eval mode, no grad, the run's autocast; `Task.report` under
train.report_best). So with the run's own settings the metrics are its final_metrics.json, to float round-off.
Under torchrun every rank evaluates its shard (the evaluators reduce over ranks) and rank 0 writes the file.
"""

import hashlib
import json
import logging
from datetime import datetime, timezone
from pathlib import Path

from rs_transfer.errors import UserError, has_control_character, one_line
from rs_transfer.options import add_run_option

log = logging.getLogger(__name__)

# Files a run folder holds (docs/engine.md, "Outputs") that --out must never replace.
RUN_FILES = frozenset({"config.yaml", "final_metrics.json", "summary.json", "weights.pth", "final.pt",
                       "metrics.jsonl", ".lock"})
# Location keys that make no sense for an evaluation: it writes no run folder nor dataset, and resumes nothing.
NOT_FOR_EVALUATION = frozenset({"output_dir", "train.resume", "data.synthetic", "data.synthetic_layout"})
# Keys that say which evaluation data of a layout are read (a split, or the files of a task whose layout names
# them), so another folder of the same kind can be evaluated; each exists in some families' schemas only.
EVAL_DATA_KEYS = frozenset({"task.val_split", "task.det_test_set", "task.val_json", "task.val_images",
                            "data.val_list", "data.eval_split"})
# Keys naming the training data, which a family's build lists (and checks against the run's classes) but an
# evaluation never reads: pointing them at the evaluation split lets a folder that holds only that split be
# evaluated (e.g. task.train_split=val). Tasks whose build reads a fixed training split (cifar100, nyu_depth,
# folder_cls, pretraining) need it present (docs/engine.md, "Evaluating a finished run").
TRAIN_DATA_KEYS = frozenset({"task.train_split", "task.det_train_sets", "task.train_json", "task.train_images",
                             "data.train_list"})


def add_command(commands) -> None:
    """The `evaluate` subcommand on cli.py's subparsers (the parser sits beside its handler)."""
    parser = commands.add_parser("evaluate", help="evaluate a finished run again (its validation set or another "
                                 "folder; evaluation settings overridable); writes a new JSON of the metrics")
    add_run_option(parser)
    parser.add_argument("--data", help="evaluate on this folder, in the layout of the run's data (sets data.root)")
    parser.add_argument("--checkpoint", help="weights to evaluate instead of RUN/weights.pth: a step checkpoint, "
                        "best.pt or final.pt (EMA weights when it holds them)")
    parser.add_argument("--out", help="the JSON file, or an existing folder for FOLDER/<name>.json "
                        "(default RUN/eval/<UTC time>-<settings hash>.json, a new file every time)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="evaluation settings (config.EVAL_KEYS, e.g. task.eval_batch_size=8) and where/how it "
                        "runs (data.root, data.num_workers, train.device, train.amp)")
    parser.set_defaults(run=run_command)


def run_command(args) -> int:
    result = evaluate_run(args.run_dir, args.overrides, data=args.data, checkpoint=args.checkpoint, out=args.out)
    if result["path"] is not None:  # rank 0
        print(f"{summary_line(result['record'])}: {result['path']}")
    return 0


def allowed_keys() -> frozenset:
    """The keys an evaluation may change, read now (other modules extend config.EVAL_KEYS)."""
    from rs_transfer.config import EVAL_KEYS, LOCATION_KEYS

    return (EVAL_KEYS | LOCATION_KEYS | EVAL_DATA_KEYS | TRAIN_DATA_KEYS) - NOT_FOR_EVALUATION


def load_eval_config(folder: Path, schema: type, overrides: list):
    """The run's config.yaml with `overrides` applied. Raises ConfigError for an unknown key (with the config
    system's did-you-mean) or a bad value, UserError naming a key that is not an evaluation setting."""
    from rs_transfer.config import load_config

    config = load_config(schema, folder / "config.yaml", overrides)  # typos and bad values: the config's errors
    allowed = allowed_keys()
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key not in allowed:
            raise UserError(f"{key} is not an evaluation setting: evaluate changes how the trained network is "
                            "evaluated (config.EVAL_KEYS, e.g. task.eval_batch_size), which data it reads (--data, "
                            "the split and list keys) and where it runs (data.num_workers, train.device, train.amp, "
                            "...), not the model or its training")
    return config


def weights_file(folder: Path, checkpoint: str | None) -> Path:
    """The file to evaluate: --checkpoint, else RUN/weights.pth. Raises RunError when it is missing."""
    from rs_transfer.runs import RunError

    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.is_file():
            raise RunError(f"--checkpoint: file not found: {path}")
        return path
    path = folder / "weights.pth"
    if not path.is_file():
        raise RunError(f"{folder} has no weights.pth: the run has not finished. Evaluate one of its checkpoints "
                       f"with --checkpoint {folder / 'checkpoints' / 'best.pt'} (or a step checkpoint), or finish "
                       "the run with --resume")
    return path


def output_path(folder: Path, out: str | None, settings: dict) -> Path:
    """Where the JSON goes: `out` (a file, or an existing folder to hold the default name), else
    RUN/eval/<UTC time>-<hash of `settings`>.json with -2, -3, ... added when that name is taken, so no earlier
    evaluation is overwritten. Raises UserError for an `out` inside the run folder that is one of its files
    (final_metrics.json, ... even before the run wrote it) or any other file there outside RUN/eval, and for an
    `out` holding a control character (the rule of every other command's --out, options.out_path)."""
    if out is not None and has_control_character(out):
        raise UserError(f"--out {out!r} holds a control character (a newline, tab, ...): a path is one line of "
                        "printable text")
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:8]
    name = f"{stamp}-{digest}"
    if out is not None and not Path(out).is_dir():
        path = Path(out)
        check_not_a_run_file(path, folder)
        return path
    parent = Path(out) if out is not None else folder / "eval"
    path, count = parent / f"{name}.json", 1
    while path.exists():
        count += 1
        path = parent / f"{name}-{count}.json"
    return path


def check_not_a_run_file(path: Path, folder: Path) -> None:
    """Raises UserError when `path` would replace a file of the run in `folder`: one of RUN_FILES directly in it,
    or an existing file anywhere in it outside RUN/eval (checkpoints, logs)."""
    path, folder = path.resolve(), folder.resolve()
    if not path.is_relative_to(folder) or path.is_relative_to(folder / "eval"):
        return
    if (path.parent == folder and path.name in RUN_FILES) or path.exists():
        raise UserError(f"--out {path} is a file of the run itself: give another name (evaluate never replaces "
                        "the run's own files)")


def check_folder_can_be_made(folder: Path) -> None:
    """Raises FileWriteError, as files.make_dir would after the evaluation, when a file stands where `folder` or
    one of its parents must be (say --out RUN/weights.pth/x.json): checked before the evaluation, which can take
    hours, so that such an --out fails at once. Creates nothing."""
    from rs_transfer.files import FileWriteError

    in_the_way = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if in_the_way is not None:
        raise FileWriteError(f"cannot create evaluation folder {folder}: {in_the_way} is a file, not a folder")


def file_facts(path: Path) -> dict:
    """{"path", "bytes", "sha256", "modified"} of a weights file: which weights were evaluated."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 24), b""):
            digest.update(block)
    stat = path.stat()
    return {"path": str(path.resolve()), "bytes": stat.st_size, "sha256": digest.hexdigest(),
            "modified": datetime.fromtimestamp(stat.st_mtime, timezone.utc).isoformat(timespec="seconds")}


def run_commit(folder: Path) -> str | None:
    """The git commit the run was trained from: config.yaml's first line (config.save_config writes it)."""
    first = (folder / "config.yaml").read_text(encoding="utf-8").partition("\n")[0]
    _, marker, commit = first.partition("git commit: ")
    return commit.strip() if marker and commit.strip() else None


def evaluated_as_the_engine_does(evaluate, model, device, amp: str) -> dict:
    """evaluate(model) in eval mode, under no_grad and train.amp's autocast (engine.device.resolve_amp, the
    trainer's one rule), as trainer._in_eval_mode calls it; the metrics as Python floats."""
    import torch

    from rs_transfer.engine.device import autocast, resolve_amp

    model.eval()
    with torch.no_grad(), autocast(resolve_amp(amp, device)[0], device):
        return {key: float(value) for key, value in evaluate(model).items()}


def evaluation_settings(config) -> dict:
    """Every evaluation key (config.EVAL_KEYS, read now) of `config` with its value; keys of other families left out."""
    from rs_transfer.config import EVAL_KEYS, flatten, to_dict

    flat = flatten(to_dict(config))
    return {key: flat[key] for key in sorted(EVAL_KEYS | EVAL_DATA_KEYS) if key in flat}


def task_with_weights(config, family: str, task_name: str | None, weights: Path, device):
    """The family's Task for `config` (its build: datasets, model, evaluator) with `weights` loaded strictly into
    the model's exported network, on `device`, as the run had it at its end. Raises the build's errors (DataError
    for missing data), WeightsError for weights that do not fit."""
    from rs_transfer.engine.device import to_channels_last
    from rs_transfer.engine.distributed import seed_everything
    from rs_transfer.engine.task import exported_network
    from rs_transfer.models.weights import load_strict, read_state_dict
    from rs_transfer.families import declaration

    # The network comes from the weights file: the starting weights the run was given are neither needed nor read.
    config.model.weights = None
    if hasattr(config.model, "inflate_from"):
        config.model.inflate_from = None
    if getattr(config.data, "synthetic", False):  # a demo run's data are where it wrote them; --data never gets any
        config.data.synthetic = False
    seed_everything(config.seed)  # as the training command, before the task is built
    task = declaration(family, task_name).build(config)
    load_strict(exported_network(task.model), read_state_dict(weights), weights,
                what=f"the {task_name or family} model of the run's config.yaml")
    task.model.to(device)
    if config.train.channels_last:  # as the run evaluated it (the trainer converts the model)
        to_channels_last(task.model)
    return task


def evaluate_run(run_dir, overrides=(), data: str | None = None, checkpoint: str | None = None,
                 out: str | None = None) -> dict:
    """Evaluate the finished run in `run_dir` (module docstring). data: a folder in the run's data layout (the same
    as data.root=DATA, applied after `overrides`); checkpoint: weights to use instead of RUN/weights.pth; out: the
    JSON file or a folder for it.

    Returns {"record": what the JSON holds (other ranks: the metrics alone), "path": where rank 0 wrote it (None on
    other ranks)}. The record:
    metrics, primary_metric, run, family, task, weights ({path, bytes, sha256, modified}), data_root, settings
    (every evaluation key with its value), overrides, world_size, device, precision, date, version, git_commit
    (now) and run_git_commit (the run's config.yaml).
    Raises RunError for a folder that is not a finished run (no weights.pth: it suggests --checkpoint and
    --resume), ConfigError / UserError for a bad or non-evaluation override, the task's own DataError for
    missing or malformed data, WeightsError for weights that do not fit, FileWriteError when the JSON cannot be
    written."""
    import rs_transfer
    from rs_transfer.config import git_commit, string_override
    from rs_transfer.files import FileWriteError, atomic_write_json, make_dir
    from rs_transfer.families import declaration
    from rs_transfer.runs import run_kind

    folder = Path(run_dir)
    family, task_name = run_kind(folder)
    weights = weights_file(folder, checkpoint)  # both before torch is imported: a wrong folder is answered at once
    from rs_transfer.engine.device import resolve_amp
    from rs_transfer.engine.distributed import init_distributed

    overrides = [*overrides, *([string_override("data.root", data)] if data is not None else [])]
    config = load_eval_config(folder, declaration(family, task_name).config, overrides)
    settings = evaluation_settings(config)
    # before the (long) evaluation, so that a bad --out fails at once
    path = output_path(folder, out, {"settings": settings, "data": config.data.root, "weights": str(weights)})
    check_folder_can_be_made(path.parent)
    info = init_distributed(config.train.device)
    task = task_with_weights(config, family, task_name, weights, info.device)
    # What the engine reports at the end of a run (trainer.run): Task.report under train.report_best, else evaluate.
    evaluate = task.report if config.train.report_best and task.report is not None else task.evaluate
    metrics = evaluated_as_the_engine_does(evaluate, task.model, info.device, config.train.amp)
    if info.rank != 0:
        return {"record": {"metrics": metrics}, "path": None}
    record = {
        "metrics": metrics, "primary_metric": task.primary_metric,
        "run": str(folder.resolve()), "family": family, "task": task_name,
        "weights": file_facts(weights),
        "data_root": str(Path(config.data.root).resolve()) if config.data.root else None,
        "settings": settings, "overrides": list(overrides),
        "world_size": info.world_size, "device": str(info.device),
        "precision": resolve_amp(config.train.amp, info.device)[0],
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "version": rs_transfer.__version__, "git_commit": git_commit(), "run_git_commit": run_commit(folder),
    }
    try:
        make_dir(path.parent, "evaluation folder")
        atomic_write_json(path, record)
    except FileWriteError as error:  # an unwritable folder loses no evaluation: the metrics are in the message
        raise FileWriteError(f"{one_line(error)}; the metrics: {json.dumps(metrics)}") from None
    return {"record": record, "path": path}


def summary_line(record: dict) -> str:
    """One line for a person: the primary metric first, then the others (per-class values left out)."""
    metrics, primary = record["metrics"], record["primary_metric"]
    shown = [primary] + [k for k in metrics if k != primary and "/" not in k]
    values = " ".join(f"{k} {metrics[k]:.4f}" for k in shown if k in metrics)
    what = record["task"] or record["family"]
    return (f"{what}: {values} on {record['data_root']} ({record['world_size']} process"
            f"{'es' if record['world_size'] > 1 else ''}, {record['device']}, {record['precision']})")
