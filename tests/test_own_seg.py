"""folder_seg: the user's own images/<split>/ + masks/<split>/ (+ classes.txt). One end-to-end run of the demo config
(it learns; its config.yaml carries the classes; predict and export work from the run folder alone, the data
removed), then the readers on tiny files in the real layout: pairing, classes, reduce_zero_label, and each pitfall
that trains to a silent mIoU of 0 as one `error:` line naming the file."""

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from engine_toy import CONFIGS
from rs_transfer.cli import main
from rs_transfer.config import ConfigError
from rs_transfer.downstream import finetune, folder_seg
from rs_transfer.downstream.data import IGNORE
from rs_transfer.errors import DataError

DEMO = CONFIGS / "downstream" / "folder_seg_demo.yaml"


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The demo config, shortened, trained once; then its data is deleted (val images kept apart for predict)."""
    folder = tmp_path_factory.mktemp("folder_seg")
    config = finetune.make_config("folder_seg", config_path=DEMO, overrides=[
        f"output_dir={folder / 'run'}", f"data.root={folder / 'data'}", "train.steps=60"])
    metrics = finetune.run(config, synthetic=True)
    val = folder_seg.pair_split(folder / "data", "val")
    masks = np.concatenate([np.array(Image.open(mask)).ravel() for _, mask in val])
    shutil.copytree(folder / "data" / "images" / "val", folder / "images")
    shutil.rmtree(folder / "data")
    return folder, metrics, masks


def test_demo_learns_and_its_config_carries_the_classes(demo_run):
    folder, metrics, masks = demo_run
    labelled = masks[masks != IGNORE]
    # All-background predictor: IoU(background) = its pixel share, the other classes 0, over the classes present.
    trivial = (labelled == 0).mean() / len(np.unique(labelled))
    assert trivial < 0.3 and metrics["miou"] > trivial + 0.4, (metrics, trivial)
    assert {f"iou/{name}" for name in folder_seg.SYNTHETIC_CLASSES} <= set(metrics)
    saved = yaml.safe_load((folder / "run" / "config.yaml").read_text())
    assert saved["task"]["class_names"] == list(folder_seg.SYNTHETIC_CLASSES)  # from the demo's classes.txt
    assert saved["model"]["num_classes"] == 4


def test_predict_writes_the_masks_indices_and_named_overlays_without_the_data(demo_run, tmp_path):
    from rs_transfer.downstream.scenes import voc_palette
    from rs_transfer.predict import predict
    from rs_transfer.predictor import overlay_classes, read_image
    from rs_transfer.runs import load_run

    folder, _, _ = demo_run
    summary = predict(folder / "run", [folder / "images"], tmp_path)
    run = load_run(folder / "run")
    names, _ = folder_seg.PREDICTOR.class_names(run.config)
    palette = voc_palette()
    colours = {c: tuple(palette[3 * c: 3 * c + 3]) for c in range(4)}
    assert summary["class_names"] == "task.class_names of the run" and len(summary["predictions"]) == 12
    for record in summary["predictions"][:3]:
        image = read_image(record["input"])
        with torch.no_grad():
            argmax = run.model({"image": image[None]})[0].argmax(0)
        with Image.open(tmp_path / record["mask"]) as png:
            np.testing.assert_array_equal(np.array(png), argmax.numpy())  # the masks' own indices
        assert [c["class"] for c in record["classes"]] == [names[i] for i in argmax.unique().tolist()]
        overlay = torch.from_numpy(np.array(Image.open(tmp_path / record["overlay"]))).permute(2, 0, 1)
        painted = overlay_classes(image, argmax, colours)
        assert torch.equal(overlay, folder_seg.PREDICTOR.draw(image, argmax, names))
        # the names are written on the painted classes: a few patches of it differ, not the picture
        changed = (overlay != painted).any(0).float().mean()
        assert 0 < changed < 0.5, changed


def test_export_needs_only_the_run(demo_run, tmp_path):
    from rs_transfer.export import export_run

    folder, _, _ = demo_run
    exported = export_run(folder / "run", "torchscript", tmp_path / "model.ts")
    # export_run checks the exported model against PyTorch on the run's evaluation size (task.crop_size)
    assert exported.path.is_file() and exported.max_abs_diff < 1e-3


def write_set(root: Path, masks: dict, classes=None, suffix=".png", mode="L") -> Path:
    """root/images/<split>/<name><suffix> (grey noise) and root/masks/<split>/<name>.png from {split: {name:
    uint8 array, or an RGB one}}; classes.txt when `classes`."""
    rng = np.random.default_rng(0)
    for split, by_name in masks.items():
        for name, mask in by_name.items():
            for kind in ("images", "masks"):
                (root / kind / split / name).parent.mkdir(parents=True, exist_ok=True)
            image = rng.integers(0, 255, (*mask.shape[:2], 3), dtype=np.uint8)
            Image.fromarray(image).save(root / "images" / split / f"{name}{suffix}")
            png = Image.fromarray(mask)
            if mode == "P" and png.mode == "L":
                png.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] * 85 + [0, 0, 0])
            png.save(root / "masks" / split / f"{name}.png")
    if classes is not None:
        (root / "classes.txt").write_text("\n".join(classes) + "\n", encoding="utf-8")
    return root


def mask(*values, size=(8, 8)) -> np.ndarray:
    """uint8 mask whose rows cycle through `values`."""
    rows = np.resize(np.array(values, dtype=np.uint8), size[0])
    return np.repeat(rows[:, None], size[1], axis=1)


def config_for(root, *overrides):
    return finetune.make_config("folder_seg", config_path=DEMO, overrides=[f"data.root={root}", *overrides])


def test_pairs_images_of_any_case_and_format_with_png_masks(tmp_path):
    write_set(tmp_path, {"train": {"a": mask(0, 1)}}, suffix=".JPG")
    write_set(tmp_path, {"train": {"sub/b": mask(0, 1)}}, suffix=".tiff")
    (tmp_path / "images" / "train" / "notes.txt").write_text("not an image")
    (tmp_path / "masks" / "train" / "a.png").rename(tmp_path / "masks" / "train" / "a.PNG")
    pairs = folder_seg.pair_split(tmp_path, "train")
    assert [(i.name, m.name) for i, m in pairs] == [("a.JPG", "a.PNG"), ("b.tiff", "b.png")]


def test_classes_come_from_the_masks_with_reduce_zero_label_and_predict_gives_them_back(tmp_path):
    split = {"x": mask(0, 1, 2, IGNORE), "y": mask(1, 2)}
    write_set(tmp_path, {"train": split, "val": split}, mode="P")
    config = config_for(tmp_path, "task.reduce_zero_label=true")
    task = folder_seg.build(config)
    # mask 0 (unlabelled) -> ignore, 1 -> class 0, 2 -> class 1, 255 stays ignore; named after the mask values
    assert config.task.class_names == ["class_1", "class_2"] and config.model.num_classes == 2
    assert np.unique(task.train_set[0]["mask"].numpy()).tolist() == [0, 1, IGNORE]
    assert sorted(task.evaluate(task.model.eval())) == ["iou/class_1", "iou/class_2", "miou"]
    # predict writes the user's mask values: the model's class + 1
    image = torch.zeros(3, 8, 8, dtype=torch.uint8)
    with torch.no_grad():
        argmax = task.model({"image": image[None]})[0].argmax(0)
        predicted = folder_seg.PREDICTOR.predict(task.model, config, image)
    assert torch.equal(predicted, argmax + 1)
    names, _ = folder_seg.PREDICTOR.class_names(config)
    assert names[1:] == ("class_1", "class_2")  # indexed by mask value


def test_classes_without_a_classes_file_are_the_values_seen(tmp_path):
    write_set(tmp_path, {"train": {"x": mask(0, 3)}, "val": {"y": mask(0, 1)}})
    config = config_for(tmp_path)
    folder_seg.build(config)
    assert config.task.class_names == ["class_0", "class_1", "class_2", "class_3"] and config.model.num_classes == 4


TWO = {"train": {"a": mask(0, 1)}, "val": {"b": mask(0, 1)}}


def unpaired(root):
    write_set(root, {"train": {"a": mask(0, 1), "c": mask(0, 1)}, "val": {"b": mask(0, 1)}})
    (root / "masks" / "train" / "c.png").rename(root / "masks" / "train" / "d.png")


def jpeg_mask(root):
    write_set(root, TWO)
    Image.fromarray(mask(0, 1)).save(root / "masks" / "train" / "a.jpg")


def no_masks(root):
    write_set(root, TWO)
    (root / "masks").rename(root / "annotations")


def other_size(root):
    write_set(root, TWO)
    Image.fromarray(mask(0, 1, size=(8, 10))).save(root / "masks" / "val" / "b.png")


PITFALLS = {
    "rgb": (lambda root: write_set(root, {"train": {"a": np.zeros((8, 8, 3), np.uint8)}, "val": {"b": mask(0, 1)}}),
            r"masks must hold class indices \(mode L or P\), \S+/masks/train/a\.png is RGB: convert your colour "
            r"masks to indices"),
    "too_large": (lambda root: write_set(root, {"train": {"a": mask(0, 1)}, "val": {"b": mask(0, 7)}},
                                         classes=["a", "b", "c"]),
                  r"mask \S+/masks/val/b\.png has value 7: 3 classes \(\S+/classes\.txt\) allow 0\.\.2 and 255"),
    "zero_255": (lambda root: write_set(root, {"train": {"a": mask(0, IGNORE)}, "val": {"b": mask(IGNORE, 0)}}),
                 r"the 2 masks under \S+/masks hold only the values 0 and 255: 255 means ignore"),
    "zero_one": (lambda root: write_set(root, TWO, classes=["a", "b", "c", "d", "e"]),
                 r"hold only the values \[0, 1\], but 5 classes are declared \(\S+/classes\.txt\)"),
    "unpaired": (unpaired, r"1 of 2 images in \S+/images/train have no mask NAME\.png in \S+/masks/train "
                           r"\(first: c\); 1 of 2 masks in \S+/masks/train have no image in \S+/images/train "
                           r"\(first: d\)"),
    "jpeg_mask": (jpeg_mask, r"mask \S+/masks/train/a\.jpg is a \.jpg file \(JPEG compression changes"),
    "no_masks": (no_masks, r"missing \S+/masks/train: expected the split's masks, NAME\.png .*; data\.root holds "
                           r"annotations/, images/$"),
    "other_size": (other_size, r"mask \S+/masks/val/b\.png is 10x8 \(width x height\), image \S+/images/val/b\.png "
                               r"is 8x8"),
    "single_class": (lambda root: write_set(root, TWO),  # with task.reduce_zero_label: only mask value 1 is a class
                     r"hold a single class \(mask value 1, besides ignore\): there is nothing to segment"),
}


@pytest.mark.parametrize("case", PITFALLS)
def test_pitfalls_are_one_error_line_naming_the_file(case, tmp_path, capsys):
    setup, message = PITFALLS[case]
    setup(tmp_path / "data")
    overrides = ["task.reduce_zero_label=true"] if case == "single_class" else []
    assert main(["finetune", "--task", "folder_seg", "--config", str(DEMO), f"data.root={tmp_path / 'data'}",
                 f"output_dir={tmp_path / 'run'}", *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert re.search(message, err.strip()), err


def test_class_settings_that_contradict_the_data_are_errors(tmp_path):
    write_set(tmp_path, TWO, classes=["background", "thing"])
    with pytest.raises(ConfigError, match=r"task.class_names=\['bg', 'thing'\] but \S+/classes.txt names "
                                          r"\['background', 'thing'\]"):
        folder_seg.build(config_for(tmp_path, "task.class_names=[bg,thing]"))
    with pytest.raises(ConfigError, match=r"model.num_classes=3, but task folder_seg has 2 outputs"):
        folder_seg.build(config_for(tmp_path, "model.num_classes=3"))
    (tmp_path / "classes.txt").write_text("background\n\nthing\n")
    with pytest.raises(DataError, match=r"classes.txt line 2 is blank"):
        folder_seg.build(config_for(tmp_path))


def test_predict_and_export_build_the_model_from_the_config_alone():
    config = finetune.make_config("folder_seg", config_path=DEMO)
    with pytest.raises(ConfigError, match="needs model.num_classes or task.class_names"):
        folder_seg.build_model(config)
    config.task.class_names = ["a", "b", "c"]
    assert folder_seg.build_model(config).eval()({"image": torch.zeros(1, 3, 32, 32, dtype=torch.uint8)}).shape[1] == 3


def test_reduce_zero_label_keeps_ignore_and_ade_is_unchanged():
    from rs_transfer.downstream.data import reduce_zero_label

    raw = np.array([0, 1, 2, 150, 254, IGNORE], dtype=np.uint8)
    assert reduce_zero_label(raw).tolist() == [IGNORE, 0, 1, 149, 253, IGNORE]
    # ADE20K's labels (0..150) map as before the generalisation: 0 -> 255, c -> c - 1
    ade = np.arange(151, dtype=np.uint8)
    assert np.array_equal(reduce_zero_label(ade), ade - np.uint8(1))


def test_scan_reads_each_mask_once_and_keeps_no_pixels(tmp_path, monkeypatch):
    write_set(tmp_path, {"train": {f"m{i}": mask(0, 1 + i % 3, size=(16, 16)) for i in range(6)}})
    opened = []
    real = folder_seg.mask_values
    monkeypatch.setattr(folder_seg, "mask_values", lambda image, path: opened.append(path) or real(image, path))
    scan = folder_seg.scan_masks(folder_seg.pair_split(tmp_path, "train"))
    assert len(opened) == len(set(opened)) == scan.masks == 6
    # what it keeps: one bool per possible value and the first mask of each value seen, not one entry per mask
    assert np.flatnonzero(scan.seen).tolist() == [0, 1, 2, 3] and scan.seen.shape == (256,)
    assert {v: p.name for v, p in scan.first.items()} == {0: "m0.png", 1: "m0.png", 2: "m1.png", 3: "m2.png"}
