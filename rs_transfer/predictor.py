"""The predictor library every family uses: the `Predictor` a family declares (a transfer task's `TASK.predictor`,
pretrain/task.py's and video/task.py's `PREDICTOR`) and the helpers its functions share: reading an image, writing
output files atomically, and drawing (torchvision's drawing utilities, matplotlib colour maps).

`rs-transfer predict` itself (listing inputs, the run loop, predictions.json) is rs_transfer/predict.py.
Importing this module imports no torch (a family's declaration is read before torch is loaded, so a config mistake
is answered at once); the functions that need torch import it when called.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
from PIL import Image

from rs_transfer.files import atomic_open, make_dir

if TYPE_CHECKING:
    import torch

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
    import torch

    from rs_transfer.downstream.data import read_image as read

    return read(Path(path)).as_subclass(torch.Tensor)


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
    import torch

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
    import torch

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
    import torch

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
    import torch

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
