"""`rs-transfer predict --run RUN_DIR --images DIR_OR_FILES --out DIR`: a trained run's model on new images (or
videos), with the task's own evaluation preprocessing, outputs in the original image's pixels.

Each task family declares a `Predictor` in its module (rs_transfer/predictor.py, the library: how it reads an
input, predicts, and writes the files of one prediction). This module is the command: listing inputs, the run loop
(a corrupt input is skipped with a warning and counted), `OUT/predictions.json`.

OUT/predictions.json: {"run", "overrides" (the key=value evaluation keys given), "family", "task", "class_names"
(where the names come from), "predictions": [one record per input: {"input": path, ...the task's fields}],
"skipped": [{"input", "reason"}], "ignored": [{"input", "reason"}] (files of an --images folder that are not
inputs), "complete"}. Predicting the same run with the same overrides into the same OUT again merges: records of
inputs not predicted this time stay. An OUT holding another run's predictions (or other overrides') is
refused.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from rs_transfer.errors import DataError, UserError
from rs_transfer.files import atomic_write_json, folder_lock
from rs_transfer.options import add_run_option, out_path

if TYPE_CHECKING:  # the library imports numpy and PIL: not at import, so the command's parser stays light
    from rs_transfer.predictor import Predictor

log = logging.getLogger(__name__)


def add_command(commands) -> None:
    """The `predict` subcommand on cli.py's subparsers."""
    predict = commands.add_parser("predict", help="a trained run's model on new images (or videos): masks, boxes, "
                                  "depth, top-5 classes")
    add_run_option(predict)
    predict.add_argument("--images", required=True, nargs="+", metavar="DIR_OR_FILE",
                         help="image (video) files, or folders searched recursively")
    predict.add_argument("--out", required=True, type=out_path("--out"),
                         help="output folder (predictions.json and the task's files)")
    predict.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    predict.add_argument("overrides", nargs="*", metavar="key=value",
                         help="evaluation keys of the run's config, e.g. task.tta=flip task.eval_mode=slide")
    predict.set_defaults(run=run_command)


def run_command(args) -> int:
    # --images takes every word after it: overrides given after it (task.tta=flip, not a file) are moved back
    overrides = [item for item in args.images if "=" in item and not Path(item).exists()]
    images = [item for item in args.images if item not in overrides]
    summary = predict(args.run_dir, images, args.out, args.device, [*args.overrides, *overrides])
    print(f"{len(summary['predictions'])} predictions ({len(summary['skipped'])} inputs skipped): "
          f"{args.out}/predictions.json")
    return 0


def list_inputs(sources: list, suffixes: tuple, ignored: list | None = None) -> list:
    """[(path, name)]: each file as given (name = its stem), each folder searched recursively for `suffixes`
    (name = the path below the folder, without suffix; hidden files and folders left out). The same file given
    twice (a file and its folder) is predicted once. Two files whose names would collide (x.jpg and x.png) keep
    their suffix in the name (x.jpg, x.png). Other files in a folder are appended to `ignored` as
    {"input", "reason"}. Raises UserError for a source that does not exist, a folder without such files, or two
    inputs that still share a name (two folders holding the same relative path)."""
    inputs, seen_files = [], set()
    for source in sources:
        path = Path(source)
        if path.is_file():
            found = [(path, path.name)]
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file()
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if ignored is not None:
                ignored += [{"input": str(p), "reason": "not an input file type"}
                            for p in files if p.suffix.lower() not in suffixes]
            found = [(p, p.relative_to(path).as_posix()) for p in files if p.suffix.lower() in suffixes]
            if not found:
                raise UserError(f"no {'/'.join(suffixes)} files under {path}")
        else:
            raise UserError(f"--images: not found: {path}")
        for file, name in found:
            if file.resolve() not in seen_files:  # a file also inside a given folder: once
                seen_files.add(file.resolve())
                inputs.append((file, name))
    # Outputs are named by the input's name without suffix, unless that would make two inputs share it.
    stems = {}
    for _, name in inputs:
        stem = str(Path(name).with_suffix("").as_posix())
        stems[stem] = stems.get(stem, 0) + 1
    inputs = [(path, stem if stems[stem] == 1 else name)
              for path, name in inputs for stem in [Path(name).with_suffix("").as_posix()]]
    seen = {}
    for path, name in inputs:
        if name in seen:
            raise UserError(f"{seen[name]} and {path} would write the same outputs ({name}): give one of them "
                            "alone, or each folder in its own run with its own --out")
        seen[name] = path
    return inputs


def check_out(out: Path, run_folder: Path, overrides=()) -> list:
    """The records of OUT/predictions.json when it was written by the same run with the same `overrides` (so a new
    predict merges into it), else []. Raises UserError naming --out for a folder that holds another run's
    predictions or the same run's with other overrides (two models' outputs would mix) or a predictions.json that
    cannot be read."""
    import json

    path = Path(out) / "predictions.json"
    if not path.is_file():
        return []
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
        old_run, records = old["run"], list(old["predictions"])
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as error:
        raise UserError(f"--out {out}: cannot read its {path.name} ({type(error).__name__}: {error}); "
                        "give an empty or new folder") from None
    if Path(old_run).resolve() != Path(run_folder).resolve():
        raise UserError(f"--out {out} holds the predictions of another run ({old_run}): give an empty or new folder")
    if list(old.get("overrides", [])) != list(overrides):
        raise UserError(f"--out {out} holds this run's predictions with the overrides {old.get('overrides', [])}, "
                        f"not {list(overrides)}: give an empty or new folder")
    return records


def predict(run_dir, sources: list, out, device: str = "auto", overrides=()) -> dict:
    """Predict every input of `sources` (files or folders) with the run in `run_dir`; write OUT's files and
    OUT/predictions.json. Returns the JSON's content. `overrides`: "key=value" evaluation keys (config.EVAL_KEYS,
    e.g. "task.tta=flip", "task.eval_mode=slide") applied to the run's config (runs.load_run).

    Raises runs.RunError for an unusable run folder, UserError for missing inputs or a task without a Predictor,
    DataError (naming the first file) when no input could be read. A corrupt input among readable ones is skipped
    with a warning, counted and listed under "skipped". Outputs written before an unexpected failure stay, and
    predictions.json then holds the predictions so far ("complete": false)."""
    from rs_transfer.families import declaration
    from rs_transfer.runs import finished_run, load_run

    # The folder and the inputs before the model (and, for a transfer task, torch): a wrong path is answered at once
    family, task = finished_run(Path(run_dir))
    predictor = declaration(family, task).predictor
    if predictor is None:
        raise UserError(f"task {task} declares no predictor (its TASK.predictor is None)")
    ignored = []
    inputs = list_inputs(sources, predictor.suffixes, ignored)
    if ignored:
        log.info("%d files under --images are not input files (%s) and are ignored; listed in predictions.json",
                 len(ignored), "/".join(predictor.suffixes))
    from rs_transfer.engine.device import resolve_device

    run = load_run(run_dir, resolve_device(device), overrides)
    # One predict per --out at a time: two would merge their records into predictions.json at once (files.folder_lock)
    with folder_lock(out, "--out"):
        return _write_predictions(Path(out), run, predictor, inputs, ignored, list(overrides))


def _write_predictions(out: Path, run, predictor: Predictor, inputs: list, ignored: list, overrides: list) -> dict:
    """Predict `inputs` into `out` (held by this process) and write out/predictions.json, merged with the same
    run's earlier records there; the contract of `predict`."""
    import torch

    earlier = check_out(out, run.folder, overrides)
    names, names_from = predictor.class_names(run.config)
    summary = {"run": str(run.folder), "overrides": overrides, "family": run.family, "task": run.task,
               "class_names": names_from,
               "predictions": [], "skipped": [], "ignored": ignored, "complete": False}
    try:
        for path, name in inputs:
            try:
                item = predictor.read(path, run.config)
            except DataError as error:
                summary["skipped"].append({"input": str(path), "reason": str(error)})
                log.warning("skipping %s: %s (%d skipped so far)", path, error, len(summary["skipped"]))
                continue
            with torch.no_grad():
                prediction = predictor.predict(run.model, run.config, item)
            record = predictor.write(out, name, item, prediction, names)
            summary["predictions"].append({"input": str(path), **record})
        if not summary["predictions"]:
            first = summary["skipped"][0]
            raise DataError(f"no input could be read ({len(inputs)} tried); {first['input']}: {first['reason']}")
        summary["complete"] = True
    finally:
        if summary["predictions"]:
            # the same run predicted into this folder before: its records of other inputs stay listed
            redone = {record["input"] for record in summary["predictions"]}
            kept = [record for record in earlier if record.get("input") not in redone]
            atomic_write_json(out / "predictions.json", {**summary, "predictions": kept + summary["predictions"]})
    return summary  # the CLI prints the count line; a notebook has the summary


