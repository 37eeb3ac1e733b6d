"""`rs-transfer predict --run RUN_DIR --images DIR_OR_FILES --out DIR`: a trained run's model on new images (or
videos), with the task's own evaluation preprocessing, outputs in the original image's pixels.

Each task family declares a `Predictor` in its module (a transfer task's `TASK.predictor`, pretrain/task.py's and
video/task.py's `PREDICTOR`): how it reads an input, predicts, and writes the files of one prediction. This module
owns what they share: listing inputs, the run loop (a corrupt input is skipped with a warning and counted),
`OUT/predictions.json`, and the drawing helpers (torchvision's drawing utilities, matplotlib colour maps).

OUT/predictions.json: {"run", "overrides" (the key=value evaluation keys given), "family", "task", "class_names"
(where the names come from), "predictions": [one record per input: {"input": path, ...the task's fields}],
"skipped": [{"input", "reason"}], "ignored": [{"input", "reason"}] (files of an --images folder that are not
inputs), "complete"}. Predicting the same run with the same overrides into the same OUT again merges: records of
inputs not predicted this time stay. An OUT holding another run's predictions (or other overrides') is
refused.
"""

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from rs_transfer.errors import DataError, UserError
from rs_transfer.files import atomic_open, atomic_write_json, folder_lock, make_dir

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
DEPTH_COLOUR_MAP = "magma"


@dataclass(frozen=True)
class Predictor:
    """What `predict` needs from a task family.

    read(path, config) -> input (raises DataError naming `path` when it cannot be decoded);
    predict(model, config, input) -> prediction, in the input's original pixels (called under torch.no_grad());
    write(out, name, input, prediction, class_names) -> the JSON record of the prediction (files go to
      out/<kind>/<name>.<ext>, `name` being the input's path relative to its folder, without suffix);
    class_names(config) -> (names or None, where they come from);
    suffixes: the input files a folder is searched for;
    draw(input, prediction, class_names) -> uint8 (3, H, W), the picture a person looks at (the overlay, the boxes,
      the coloured depth), or None for tasks whose output is a list (classification): `write` saves it, and
      `visualizer` sends it to TensorBoard at every evaluation.
    """

    read: Callable
    predict: Callable
    write: Callable
    class_names: Callable
    suffixes: tuple = IMAGE_SUFFIXES
    draw: Callable | None = None


def read_image(path, config=None) -> torch.Tensor:
    """uint8 (3, H, W) RGB of an image file (downstream.data.read_image: any PIL mode). Raises DataError."""
    from rs_transfer.downstream.data import read_image as read

    return read(Path(path)).as_subclass(torch.Tensor)


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
    from rs_transfer.runs import family_parts, load_run

    from rs_transfer.engine.device import resolve_device

    run = load_run(run_dir, resolve_device(device), overrides)
    predictor = family_parts(run.family, run.task)[2]
    if predictor is None:
        raise UserError(f"task {run.task} declares no predictor (its TASK.predictor is None)")
    ignored = []
    inputs = list_inputs(sources, predictor.suffixes, ignored)
    if ignored:
        log.info("%d files under --images are not input files (%s) and are ignored; listed in predictions.json",
                 len(ignored), "/".join(predictor.suffixes))
    # One predict per --out at a time: two would merge their records into predictions.json at once (files.folder_lock)
    with folder_lock(out, "--out"):
        return _write_predictions(Path(out), run, predictor, inputs, ignored, list(overrides))


def _write_predictions(out: Path, run, predictor: Predictor, inputs: list, ignored: list, overrides: list) -> dict:
    """Predict `inputs` into `out` (held by this process) and write out/predictions.json, merged with the same
    run's earlier records there; the contract of `predict`."""
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


def output_path(out: Path, kind: str, name: str, suffix: str) -> Path:
    path = Path(out) / kind / f"{name}{suffix}"
    make_dir(path.parent, "prediction folder")
    return path


def save_png(path: Path, image: Image.Image) -> Path:
    with atomic_open(path, "wb") as file:
        image.save(file, format="PNG")
    return path


def save_rgb(path: Path, image: torch.Tensor) -> Path:
    """uint8 (3, H, W) -> an RGB PNG."""
    return save_png(path, Image.fromarray(image.permute(1, 2, 0).cpu().numpy()))


def palette_png(indices: np.ndarray, palette: list) -> Image.Image:
    """uint8 (H, W) class indices -> a palette ("P") PNG image whose pixel values are the indices."""
    image = Image.fromarray(indices.astype(np.uint8))  # mode L; putpalette makes it P, the values unchanged
    image.putpalette(palette)
    return image


def overlay_classes(image: torch.Tensor, indices: torch.Tensor, colours: dict, skip=(), alpha: float = 0.5) -> torch.Tensor:
    """uint8 (3, H, W) image with every class of `indices` (H, W) but those in `skip` painted in colours[class]
    (torchvision's draw_segmentation_masks)."""
    from torchvision.utils import draw_segmentation_masks

    present = [c for c in indices.unique().tolist() if c not in skip]
    if not present:
        return image
    masks = torch.stack([indices == c for c in present])
    return draw_segmentation_masks(image, masks, alpha=alpha, colors=[colours[c] for c in present])


LABEL_GRID = 256  # name_classes places names on a grid of at most this many pixels a side


def most_interior(mask: torch.Tensor) -> tuple:
    """(y, x) of a pixel of bool `mask` (H, W) farthest from every pixel outside it (chessboard distance; the first
    such pixel in raster order): the mask eroded (a 3x3 min-pool, torch's max_pool2d of the complement) until one
    more erosion would leave nothing. A distance transform in torch, because the GPU check's device has no scipy."""
    current = mask
    while True:
        eroded = torch.nn.functional.max_pool2d((~current)[None, None].float(), 3, stride=1, padding=1)[0, 0] == 0
        if not eroded.any():
            break
        current = eroded
    y, x = current.nonzero()[0].tolist()
    return y, x


def name_classes(image: torch.Tensor, indices: torch.Tensor, names, colours: dict, skip=()) -> torch.Tensor:
    """uint8 (3, H, W) `image` with names[class] written on a patch of colours[class] for every class of `indices`
    (H, W) but those in `skip`, centred on the class's most interior pixel (farthest from any other class and from
    the border, `most_interior`, on a grid of at most LABEL_GRID pixels a side), so a name sits inside its region and
    apart from the others' (torchvision's draw_bounding_boxes: an empty box, a filled label).
    """
    from PIL import ImageFont
    from torchvision.utils import draw_bounding_boxes

    font = ImageFont.load_default()  # the font draw_bounding_boxes writes with
    height, width = indices.shape
    step = max(1, -(-max(height, width) // LABEL_GRID))
    grid = torch.nn.functional.pad(indices[::step, ::step], (1, 1, 1, 1), value=-1)  # -1: the border is another class
    boxes, labels, fills, inks = [], [], [], []
    for c in indices.unique().tolist():
        if c in skip:
            continue
        y, x = most_interior(grid == c)
        label = str(names[c])
        left, top, right, bottom = font.getbbox(label)
        x = min(max(0, (x - 1) * step - (right - left) // 2), max(0, width - (right - left) - 3))
        y = min(max(0, (y - 1) * step - (bottom - top) // 2), max(0, height - (bottom - top) - 3))
        boxes.append([x, y, x, y])
        labels.append(label)
        fills.append(colours[c])
        # dark text on light colours, white on dark ones (ITU-R BT.601 luma)
        inks.append((0, 0, 0) if 0.299 * colours[c][0] + 0.587 * colours[c][1] + 0.114 * colours[c][2] > 128
                    else (255, 255, 255))
    if not labels:
        return image
    return draw_bounding_boxes(image, torch.tensor(boxes), labels=labels, colors=fills, width=0, label_colors=inks,
                               fill_labels=True)


def colour_map(values: np.ndarray, low: float, high: float, name: str = DEPTH_COLOUR_MAP) -> np.ndarray:
    """float (H, W) -> uint8 (H, W, 3) through matplotlib's colour map `name`, `low`..`high` spanning it."""
    from matplotlib import colormaps

    scaled = (values - low) / max(high - low, 1e-12)
    return (colormaps[name](np.clip(scaled, 0, 1))[..., :3] * 255).round().astype(np.uint8)


def top_classes(scores: torch.Tensor, class_names, k: int = 5) -> list:
    """The k highest of `scores` (classes,) (probabilities) as [{"index", "class", "score"}], best first; "class"
    is the index as a string when there are no names."""
    values, indices = scores.float().topk(min(k, scores.numel()))
    return [{"index": int(i), "class": class_names[i] if class_names else str(int(i)), "score": float(v)}
            for v, i in zip(values.tolist(), indices.tolist())]


VISUALIZED_IMAGES = 4


def visualizer(dataset, predictor: Predictor, config, count: int = VISUALIZED_IMAGES) -> Callable:
    """The engine's Task.visualize for a task with a `draw`: `count` fixed validation images (evenly spaced over
    `dataset`, whose samples hold "image" uint8 (3, H, W)), predicted and drawn as `predict` draws them, so a user
    watching TensorBoard sees the run learn. Returns model -> {"val_<index>": uint8 (3, H, W)}."""
    indices = sorted({round(i * (len(dataset) - 1) / max(count - 1, 1)) for i in range(min(count, len(dataset)))})
    names, _ = predictor.class_names(config)

    def visualize(model) -> dict:
        pictures = {}
        for index in indices:
            image = dataset[index]["image"].as_subclass(torch.Tensor)
            pictures[f"val_{index}"] = predictor.draw(image, predictor.predict(model, config, image), names)
        return pictures

    return visualize


def write_top5(out: Path, name: str, item, prediction: torch.Tensor, class_names) -> dict:
    """Classification's writer: the record {"top5": top_classes(prediction)} (prediction: probabilities)."""
    return {"top5": top_classes(prediction, class_names)}
