"""NYU Depth v2 monocular depth: the segmentation model with one output channel, delta < 1.25 (plus abs-rel, RMSE).

Two layouts (task.nyu_format, "auto" picks the one present):
  h5:  the sparse-to-dense / FastDepth release, the paper's 47,584 / 654 split: data.root holds nyudepthv2/
       (or is it) with train/<scene>/<n>.h5 and val/official/<n>.h5; each file has `rgb` (uint8 3x480x640) and
       `depth` (float32 480x640, metres).
  bts: the BTS "sync" layout: data.root holds nyudepthv2_train_files_with_gt.txt and
       nyudepthv2_test_files_with_gt.txt (lines "RGB DEPTH FOCAL", paths relative to sync/ for train and to
       official_splits/test/ for test; DEPTH "None" = no ground truth, skipped), depth PNGs are uint16 millimetres.

The network predicts log-depth; the loss is the L1 distance in log space over valid pixels (ratio errors, the
quantity delta < 1.25 measures). Evaluation: full image, ground truth inside (depth_min, depth_max) and, with
task.eigen_crop, inside the Eigen crop (rows 45:471, cols 41:601 of 480x640, scaled for other sizes); errors averaged
per image then over images (task.depth_average=images, BTS/AdaBins) or over all pixels (pixels); metrics.depth_sums.

Importing this module imports no torch (the layout and the config are checked before torch is loaded): each
function imports what it needs; the model is fpn.DepthModel.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

from rs_transfer.config import above, at_least, checked, data_root, one_of, ordered
from rs_transfer.downstream.config import DenseSection, FinetuneConfig, arch_args, check_num_classes
from rs_transfer.downstream.data import find_dir, read_image, read_text_lines, require
from rs_transfer.downstream.metrics import DEPTH_AVERAGES
from rs_transfer.downstream.protocol import Protocol
from rs_transfer.downstream.registry import TransferTaskDeclaration, section_suffix
from rs_transfer.downstream.scenes import depth_scene
from rs_transfer.errors import DataError
from rs_transfer.predictor import Predictor, colour_map, output_path, save_png, save_rgb, visualizer
from rs_transfer.predictor import read_image as read_image_file

if TYPE_CHECKING:
    import torch
    from torch import nn

    from rs_transfer.downstream.dense_inference import Inference
    from rs_transfer.downstream.fpn import DepthModel
    from rs_transfer.engine.task import Task

log = logging.getLogger(__name__)

EIGEN_CROP = (45, 471, 41, 601)  # rows, cols of a 480 x 640 image
BTS_LISTS = {"train": "nyudepthv2_train_files_with_gt.txt", "val": "nyudepthv2_test_files_with_gt.txt"}
BTS_DIRS = {"train": "sync", "val": "official_splits/test"}
BTS_LIST = "the BTS file list (lines 'RGB DEPTH FOCAL')"
NYU_LAYOUT = "nyudepthv2/ (or the BTS lists)"  # what data.root holds, for its error
FILLS = {"image": 0, "depth": 0.0}
# The paper's depth grid is 10k-40k steps; the crop is 640 (scale jitter [0.5, 2.0]).
PROTOCOL = Protocol("delta1", (10000, 20000, 40000), 64, 640, "NYU depth <1.25 %")


@dataclass
class NYUDepthSection(DenseSection):
    RELATIONS = (DenseSection.RELATIONS[0], ordered("depth_min", "depth_max", strict=True), *DenseSection.RELATIONS[1:])

    name: str = "nyu_depth"
    # "h5" (sparse-to-dense release), "bts" (sync PNGs + file lists) or "auto"
    nyu_format: str = checked("auto", one_of("auto", "h5", "bts"))
    depth_min: float = checked(1e-3, at_least(0))  # metres; ground truth outside (depth_min, depth_max) is not evaluated
    depth_max: float = checked(10.0, above(0))
    eigen_crop: bool = True  # evaluate inside the Eigen et al. crop (rows 45:471, cols 41:601 of 480x640)
    # delta1 / abs_rel / rmse: "images" = per image, then the mean over images (BTS and AdaBins compute_errors, the
    # published NYU numbers); "pixels" = pooled over every valid pixel of the set. Both are reported, suffixed.
    depth_average: str = checked("images", one_of(*DEPTH_AVERAGES))


@dataclass
class NYUDepthConfig(FinetuneConfig):
    task: NYUDepthSection = field(default_factory=NYUDepthSection)


def depth_collate(samples: list) -> dict:
    from rs_transfer.downstream.transforms import pad_collate

    return pad_collate(samples, FILLS)


def read_h5(path: Path) -> tuple:
    import h5py
    import torch
    from torchvision import tv_tensors

    try:
        with h5py.File(path, "r") as f:
            rgb, depth = np.asarray(f["rgb"]), np.asarray(f["depth"], dtype=np.float32)
    except (OSError, KeyError) as error:
        raise DataError(f"{path}: expected an HDF5 file with 'rgb' (3xHxW uint8) and 'depth' (HxW metres): {error}") from None
    if rgb.ndim != 3 or rgb.shape[0] != 3 or depth.shape != rgb.shape[1:]:
        raise DataError(f"{path}: rgb {rgb.shape} and depth {depth.shape}: expected 3xHxW and HxW")
    if rgb.dtype != np.uint8:  # casting would wrap 16-bit values and floor [0, 1] floats to black
        raise DataError(f"{path}: rgb is {rgb.dtype.name}: expected uint8 (0..255), as the sparse-to-dense release")
    return tv_tensors.Image(torch.from_numpy(rgb)), torch.from_numpy(depth)


def read_depth_png(path: Path) -> torch.Tensor:
    import torch

    try:
        with Image.open(require(path, "a 16-bit depth PNG (millimetres)")) as image:
            array = np.array(image)
    except (UnidentifiedImageError, OSError) as error:
        raise DataError(f"cannot read depth {path}: {error}") from None
    if array.dtype != np.uint16 and array.dtype != np.int32:
        raise DataError(f"depth {path} is {array.dtype}: expected a 16-bit PNG in millimetres")
    return torch.from_numpy(array.astype(np.float32) / 1000.0)


def detect_format(root) -> str:
    root = Path(root)
    if (root / BTS_LISTS["train"]).is_file():
        return "bts"
    return "h5"


def h5_dir(root, split: str) -> Path:
    """nyudepthv2/<split> (the sparse-to-dense release); DataError naming what is missing, files not listed."""
    base = find_dir(root, ("nyudepthv2", "."), "NYU Depth v2 (a nyudepthv2 folder with train/ and val/)")
    return require(base / split, f"nyudepthv2/{split}/<scene>/*.h5 (the sparse-to-dense release)")


def h5_files(root, split: str) -> list:
    folder = h5_dir(root, split)
    files = sorted(folder.rglob("*.h5"))
    if not files:
        raise DataError(f"no .h5 files under {folder}: expected {split}/<scene>/<n>.h5")
    return files


def bts_items(root, split: str) -> list:
    root = Path(root)
    listing = root / BTS_LISTS[split]
    base = root / BTS_DIRS[split]
    items = []
    for number, line in enumerate(read_text_lines(listing, BTS_LIST), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 2:
            raise DataError(f"{listing} line {number}: expected 'RGB DEPTH FOCAL', got {line!r}")
        if parts[1] == "None":
            continue
        items.append((base / parts[0].lstrip("/"), base / parts[1].lstrip("/"), number))
    if not items:
        raise DataError(f"{listing} lists no image with ground truth")
    return _present_pairs(items, listing, split)


def _present_pairs(items: list, listing: Path, split: str) -> list:
    """[(image, depth)] of `items` [(image, depth, line)] checked at start-up (a stat per file), not when an epoch
    reaches a missing file hours in. Training pairs with a file missing are left out with one warning (a copy of
    sync/ short of a few scenes still trains); an evaluation pair missing is a DataError naming the file and its
    line, as is a training list none of whose pairs is there (data.root is most likely the wrong folder)."""
    present, missing = [], []
    for image, depth, number in items:
        absent = next((path for path in (image, depth) if not path.is_file()), None)
        (missing if absent else present).append((absent, number) if absent else (image, depth))
    if missing and (split != "train" or not present):
        path, number = missing[0]
        raise DataError(f"{listing} line {number}: {path} is missing ({len(missing)} of the {len(items)} listed pairs "
                        f"have a file missing{'' if split == 'train' else '; every test pair counts in delta1'})")
    if missing:
        log.warning("%s: %d of the %d listed pairs have a file missing and are left out (first: line %d, %s)",
                    listing, len(missing), len(items), missing[0][1], missing[0][0])
    return present


class NYUDepth:
    """{"image": uint8 3xHxW, "depth": float32 HxW metres, 0 = no measurement} after `transform`.

    No torch `Dataset` base: a map-style dataset is any object with `__getitem__` and `__len__` (torch.utils.data),
    which DataLoader, Subset and the engine accept, and the base would import torch with this module."""

    def __init__(self, root, split: str, fmt: str = "auto", transform=None):
        data_root(root, NYU_LAYOUT)
        self.format = detect_format(root) if fmt == "auto" else fmt
        if self.format not in ("h5", "bts"):
            raise DataError(f"task.nyu_format={fmt!r}: expected 'h5', 'bts' or 'auto'")
        self.items = h5_files(root, split) if self.format == "h5" else bts_items(root, split)
        self.transform = transform

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        from torchvision import tv_tensors

        if self.format == "h5":
            image, depth = read_h5(self.items[index])
        else:
            image_path, depth_path = self.items[index]
            image, depth = read_image(image_path), read_depth_png(depth_path)
            if depth.shape != image.shape[-2:]:
                raise DataError(f"depth {depth_path} is {tuple(depth.shape)}, image {tuple(image.shape[-2:])}")
        sample = {"image": image, "depth": tv_tensors.Mask(depth)}
        return self.transform(sample) if self.transform else sample


def check_data(config) -> None:
    """The layout `build` reads (task.nyu_format; auto: `detect_format`), checked without torch and without listing
    or opening a file: h5: nyudepthv2/train/ and val/ (`h5_dir`); bts: both file lists and the folders they are
    relative to (sync/, official_splits/test/). Raises ConfigError when data.root is unset, DataError naming the
    first missing folder or list (`build` names the same, but for a missing BTS folder, which it reports as the
    first listed file missing)."""
    root = data_root(config.data.root, NYU_LAYOUT)
    fmt = detect_format(root) if config.task.nyu_format == "auto" else config.task.nyu_format
    for split in ("train", "val"):
        if fmt == "h5":
            h5_dir(root, split)
        else:
            require(root / BTS_LISTS[split], BTS_LIST)
            require(root / BTS_DIRS[split], f"the folder the paths of {BTS_LISTS[split]} are relative to")


def eval_mask(gt: torch.Tensor, depth_min: float, depth_max: float, eigen_crop: bool, sizes: list) -> torch.Tensor:
    import torch

    valid = (gt > depth_min) & (gt < depth_max)
    if eigen_crop:
        crop = torch.zeros_like(valid)
        for i, (height, width) in enumerate(sizes):
            top, bottom, left, right = EIGEN_CROP
            crop[i, round(top * height / 480):round(bottom * height / 480), round(left * width / 640):round(right * width / 640)] = True
        valid &= crop
    return valid


def make_evaluator(val_set, task_cfg, num_workers: int = 0):
    """NYU depth metrics of `model(batch)` (eval mode: depth in metres, (N, H, W)) over `val_set`, each rank a
    contiguous part, sums reduced over ranks (metrics.depth_metrics): "delta1" (share of pixels with
    max(pred / gt, gt / pred) < 1.25) a fraction, "abs_rel" relative, "rmse" in metres, averaged as
    task_cfg.depth_average says, both averages suffixed ("delta1_images", "delta1_pixels", ...), the "pixels" and
    "images" evaluated and the fractions with a non-finite prediction ("nonfinite_pixels", "nonfinite_images";
    logged). Predictions clamped to (task_cfg.depth_min, task_cfg.depth_max), pixels with ground truth inside it,
    optionally the Eigen crop. Predicted as task_cfg.eval_mode / tta say (depth_outputs); the names but the counts
    "pixels" and "images" then carry the inference suffix ("delta1_slide", "nonfinite_pixels_flip", ...). Raises
    DataError when no pixel of the set has valid ground truth."""
    import torch

    from rs_transfer.downstream.dense_inference import Inference, rename_metrics
    from rs_transfer.downstream.metrics import DEPTH_SUMS, depth_metrics, depth_sums
    from rs_transfer.engine.device import model_device, to_device
    from rs_transfer.engine.distributed import is_main
    from rs_transfer.engine.loader import eval_batches

    inference = Inference.of(task_cfg)

    def evaluate(model: nn.Module) -> dict:
        device = model_device(model)
        sums = torch.zeros(len(DEPTH_SUMS), dtype=torch.float64, device=device)
        with torch.no_grad():
            for batch in eval_batches(val_set, task_cfg.eval_batch_size, _collate_with_sizes, num_workers, device):
                batch = to_device(batch, device)
                # depth_sums clamps the prediction, counting its non-finite values first
                pred = depth_outputs(model, batch["image"], inference)
                valid = eval_mask(batch["depth"], task_cfg.depth_min, task_cfg.depth_max, task_cfg.eigen_crop,
                                  batch["size"])
                sums += depth_sums(pred, batch["depth"], valid, task_cfg.depth_min, task_cfg.depth_max)
        crop = " and the Eigen crop" if task_cfg.eigen_crop else ""
        metrics = depth_metrics(sums, f"ground-truth depth inside ({task_cfg.depth_min}, {task_cfg.depth_max}) m{crop} "
                                      f"in {len(val_set)} images", task_cfg.depth_average)
        if metrics["nonfinite_pixels"] and is_main():
            log.warning("depth evaluation: %.4g of the evaluated pixels (in %.4g of the images) have a NaN or infinite "
                        "prediction, evaluated as depth_min (NaN) or depth_max (inf), as BTS and AdaBins do",
                        metrics["nonfinite_pixels"], metrics["nonfinite_images"])
        return rename_metrics(metrics, section_suffix(task_cfg), keep=("pixels", "images"))

    return evaluate


def metric_name(section) -> str:
    """The primary metric of a run with this task section (dataclass or config.yaml dict): "delta1",
    "delta1_slide", "delta1_ms_flip", ... (registry.metric_suffix)."""
    return PROTOCOL.metric + section_suffix(section)


def depth_outputs(model: nn.Module, images: torch.Tensor, inference: Inference) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> depth in metres (N, H, W); with TTA the mean of the views' depth maps
    (dense_inference.infer). The default (whole, none) is `model` itself."""
    from rs_transfer.downstream.dense_inference import infer

    return infer(lambda x: model({"image": x})[:, None], images, inference, probabilities=False)[:, 0]


def _collate_with_sizes(samples: list) -> dict:
    batch = depth_collate(samples)
    batch["size"] = [tuple(s["image"].shape[-2:]) for s in samples]  # before padding, for the Eigen crop
    return batch


def build_model(config) -> DepthModel:
    """The FPN depth model (one output channel; eval mode: depth in metres (N, H, W)) from the config alone.
    Raises ConfigError for model.num_classes other than 1, WeightsError for model.weights that do not fit."""
    from rs_transfer.downstream.fpn import DepthModel

    task_cfg = config.task
    check_num_classes(config, 1)
    return DepthModel(config.model.name, weights=config.model.weights, fpn_channels=task_cfg.fpn_channels,
                      head_channels=task_cfg.head_channels, **arch_args(config))


def predict(model, config, image: torch.Tensor) -> torch.Tensor:
    """uint8 (3, H, W) -> depth in metres float32 (H, W) at the image's own size (task.eval_mode, task.tta:
    depth_outputs), clamped to (task.depth_min, task.depth_max), as the evaluator does."""
    from rs_transfer.downstream.dense_inference import Inference
    from rs_transfer.engine.device import model_device

    depth = depth_outputs(model, image[None].to(model_device(model)), Inference.of(config.task))[0]
    return depth.clamp(config.task.depth_min, config.task.depth_max).float().cpu()


def draw_depth(image: torch.Tensor, depth: torch.Tensor, class_names=None) -> torch.Tensor:
    """uint8 (3, H, W): the depth (H, W) in metres through matplotlib's magma, nearest = dark, from the image's own
    range; `image` is not drawn on (depth has no overlay)."""
    import torch

    view = colour_map(depth.numpy(), float(depth.min()), float(depth.max()))
    return torch.from_numpy(view).permute(2, 0, 1).contiguous()


def write_depth(out, name: str, image: torch.Tensor, depth: torch.Tensor, class_names) -> dict:
    """depth/<name>.png: uint16 millimetres (the BTS convention: round(metres x 1000), 0 = none; 65.535 m at most),
    and depth_view/<name>.png: `draw_depth`."""
    millimetres = np.clip(np.round(depth.numpy().astype(np.float64) * 1000), 0, np.iinfo(np.uint16).max)
    png = save_png(output_path(out, "depth", name, ".png"), Image.fromarray(millimetres.astype(np.uint16)))
    view = save_rgb(output_path(out, "depth_view", name, ".png"), draw_depth(image, depth))
    return {"depth": png.relative_to(out).as_posix(), "view": view.relative_to(out).as_posix(), "units": "mm",
            "min_m": float(depth.min()), "max_m": float(depth.max())}


def build(config) -> Task:
    """The nyu_depth Task: NYU Depth v2 (task.nyu_format: the labelled .mat (HDF5) or the BTS folders), the FPN
    model with one output channel (eval mode: depth in metres (N, H, W)), delta1 / abs_rel / rmse (make_evaluator).
    Raises DataError for a missing or malformed dataset, ConfigError for model.num_classes other than 1."""
    from torchvision import tv_tensors

    from rs_transfer.downstream.transforms import dense_train_transform
    from rs_transfer.engine.task import Task

    task_cfg = config.task
    check_num_classes(config, 1)
    transform = dense_train_transform(task_cfg.crop_size, (task_cfg.scale_min, task_cfg.scale_max),
                                      {tv_tensors.Image: 0, tv_tensors.Mask: 0.0})
    train_set = NYUDepth(config.data.root, "train", task_cfg.nyu_format, transform)
    val_set = NYUDepth(config.data.root, "val", task_cfg.nyu_format)
    model = build_model(config)
    return Task(model=model, train_set=train_set, evaluate=make_evaluator(val_set, task_cfg, config.data.num_workers),
                primary_metric=metric_name(task_cfg), collate_fn=depth_collate,
                visualize=visualizer(val_set, PREDICTOR, config))


def write_nyu_h5(root, train=32, val=8, size=(96, 128), seed=0) -> Path:
    """nyudepthv2/train/<scene>/<n>.h5 and val/official/<n>.h5 with `rgb` (3xHxW uint8) and `depth` (HxW
    float32 metres). The real release is 480x640; `size` is smaller so the demo runs fast."""
    import h5py

    rng = np.random.default_rng(seed)
    base = Path(root) / "nyudepthv2"
    for split, count in (("train", train), ("val", val)):
        for i in range(count):
            scene_dir = base / split / ("official" if split == "val" else f"scene_{i % 3:04d}")
            scene_dir.mkdir(parents=True, exist_ok=True)
            image, depth = depth_scene(rng, *size)
            with h5py.File(scene_dir / f"{i:05d}.h5", "w") as f:
                f.create_dataset("rgb", data=image.transpose(2, 0, 1))
                f.create_dataset("depth", data=depth)
    return Path(root)


def write_nyu_bts(root, train=8, val=4, size=(96, 128), seed=0) -> Path:
    """The BTS sync layout: sync/<scene>/rgb_<n>.jpg + sync_depth_<n>.png (uint16 mm), official_splits/test/
    likewise, and the two file lists (train paths start with '/', as BTS's do; one test line has no depth)."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    lines = {"train": [], "val": []}
    for split, count, folder in (("train", train, "sync"), ("val", val, "official_splits/test")):
        for i in range(count):
            scene_name = f"kitchen_{i % 2:04d}"
            (root / folder / scene_name).mkdir(parents=True, exist_ok=True)
            image, depth = depth_scene(rng, *size)
            rgb, dep = f"{scene_name}/rgb_{i:05d}.jpg", f"{scene_name}/sync_depth_{i:05d}.png"
            Image.fromarray(image).save(root / folder / rgb, quality=95)
            Image.fromarray(np.round(depth * 1000).astype(np.uint16)).save(root / folder / dep)
            prefix = "/" if split == "train" else ""
            lines[split].append(f"{prefix}{rgb} {prefix}{dep} 518.8579")
    lines["val"].append("bathroom/rgb_00999.jpg None 518.8579")
    (root / "nyudepthv2_train_files_with_gt.txt").write_text("\n".join(lines["train"]) + "\n")
    (root / "nyudepthv2_test_files_with_gt.txt").write_text("\n".join(lines["val"]) + "\n")
    return root


def write_synthetic(root, train: int, val: int):
    return write_nyu_h5(root, train=train, val=val)


PREDICTOR = Predictor(read=read_image_file, predict=predict, write=write_depth,
                      class_names=lambda config: (None, "none: depth has no classes"), draw=draw_depth)

TASK = TransferTaskDeclaration(
    name="nyu_depth", config=NYUDepthConfig, build=build, protocol=PROTOCOL, write_synthetic=write_synthetic,
    build_model=build_model, predictor=PREDICTOR, check_data=check_data,
    # Table 5, percent: (backbone, method, pretraining epochs) -> value
    paper={("R152", "supervised", 90): 81.2, ("R152", "SimCLR", 800): 83.5, ("R152", "SimCLRv2", 800): 84.7,
           ("R152", "RS", 400): 83.4, ("R152 2x", "supervised", 90): 82.5, ("R152 2x", "SimCLR", 800): 86.8,
           ("R152 2x", "SimCLRv2", 800): 86.1, ("R152 2x", "RS", 400): 84.7},
)
