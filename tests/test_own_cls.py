"""folder_cls: classification on your own class folders (data.root/train/<class>/*, data.root/val/<class>/*).

One end-to-end run of the demo config (it learns the synthetic folders, whose names hold spaces and unicode), shared
by predict and export; the rest reads tiny files in the real layout: which files are images, the layout's errors
(each names the file or folder), class names from the folders or the config, per-class accuracy."""

import json
import logging
import re

import pytest
import torch
from PIL import Image

from engine_toy import CONFIGS
from rs_transfer.config import ConfigError, load_config, save_config
from rs_transfer.downstream import finetune, folder_cls
from rs_transfer.engine.classification import TopK, fractions
from rs_transfer.errors import DataError

DEMO = CONFIGS / "downstream" / "folder_cls_demo.yaml"
NAMES = sorted(name for name, _ in folder_cls.SYNTHETIC_CLASSES)


def config_for(root, *overrides):
    return finetune.make_config("folder_cls", config_path=DEMO, overrides=[f"data.root={root}", *overrides])


def write_image(path, colour=(200, 30, 30), size=(12, 10), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format=fmt)
    return path


def tiny_folders(root, classes=("cat", "dog")):
    for split in ("train", "val"):
        for k, name in enumerate(classes):
            write_image(root / split / name / f"{split}_{k}.jpg", fmt="JPEG")
    return root


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("folder_cls")
    config = config_for(folder / "data", f"output_dir={folder / 'run'}", "train.steps=100")
    metrics = finetune.run(config, synthetic=True)
    return folder, metrics


def test_demo_learns_the_folders_and_the_run_carries_the_class_names(run):
    folder, metrics = run
    assert metrics["top1"] > 0.8, metrics  # 6 classes, as many images each: chance 1/6
    assert 0 <= metrics["top5"] <= 1 and sorted(k for k in metrics if k.startswith("acc/")) == [
        f"acc/{name}" for name in NAMES]
    saved = json.loads((folder / "run" / "final_metrics.json").read_text(encoding="utf-8"))
    assert saved["acc/Ünïcode square"] == pytest.approx(metrics["acc/Ünïcode square"])
    reloaded = load_config(folder_cls.FolderClsConfig, folder / "run" / "config.yaml")
    assert reloaded.task.class_names == NAMES and reloaded.model.num_classes == 6


def test_predict_gives_the_top5_names_of_the_runs_classes(run, tmp_path):
    from rs_transfer.predict import predict
    from rs_transfer.predictor import read_image
    from rs_transfer.pretrain.transforms import eval_transform
    from rs_transfer.runs import load_run

    folder, metrics = run
    images = folder / "data" / "val" / "Ünïcode square"
    # The run's config carries the class names: predict needs no training data.
    (folder / "data" / "train").rename(folder / "data" / "train_moved")
    try:
        summary = predict(folder / "run", [images], tmp_path / "out")
        model = load_run(folder / "run").model
    finally:
        (folder / "data" / "train_moved").rename(folder / "data" / "train")
    assert len(summary["predictions"]) == len(list(images.iterdir())) == 10
    for record in summary["predictions"]:
        pil = Image.fromarray(read_image(record["input"]).permute(1, 2, 0).numpy())
        with torch.no_grad():
            logits = model({"image": eval_transform(48)(pil)[None]})[0]
        top5 = logits.softmax(0).topk(5).indices.tolist()
        assert [c["index"] for c in record["top5"]] == top5
        assert [c["class"] for c in record["top5"]] == [NAMES[i] for i in top5]
    # the evaluator's preprocessing: as many right as its accuracy of the class says
    right = sum(r["top5"][0]["class"] == "Ünïcode square" for r in summary["predictions"])
    assert right == round(metrics["acc/Ünïcode square"] * 10)


def test_export_runs_the_model_at_the_task_image_size(run, tmp_path, capsys):
    from rs_transfer.cli import main
    from rs_transfer.export import _eval_size
    from rs_transfer.runs import load_run

    folder, _ = run
    assert _eval_size(load_run(folder / "run")) == 48  # task.image_size: what the evaluator feeds the model
    # export runs the written file back against PyTorch before it reports
    assert main(["export", "--run", str(folder / "run"), "--format", "torchscript", "--out", str(tmp_path)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["path"] == str(tmp_path / "model.ts") and result["max_abs_diff"] <= 1e-4


def test_image_files_any_case_any_depth_hidden_and_other_files_left_out(tmp_path, caplog):
    root = tiny_folders(tmp_path)
    cat = root / "train" / "cat"
    for name, fmt in (("a.JPG", "JPEG"), ("b.Png", "PNG"), ("c.TIFF", "TIFF"), ("d.gif", "GIF"),
                      ("more/e.webp", "WEBP"), ("f.bmp", "BMP")):
        write_image(cat / name, fmt=fmt)
    (cat / "._a.JPG").write_bytes(b"\x00\x05\x16\x07")  # macOS AppleDouble metadata, not a JPEG
    write_image(cat / ".ipynb_checkpoints" / "g.jpg", fmt="JPEG")
    (cat / "notes.txt").write_text("about cats")
    (cat / "labels.csv").write_text("a,b")
    with caplog.at_level(logging.INFO, logger="rs_transfer.downstream.folder_cls"):
        train, val = folder_cls.build_datasets(config_for(root))
    names = sorted(item.where.split("/train/")[-1] for item in train if item.label == 0)
    assert names == ["cat/a.JPG", "cat/b.Png", "cat/c.TIFF", "cat/d.gif", "cat/f.bmp", "cat/more/e.webp",
                     "cat/train_0.jpg"]
    assert [r.getMessage() for r in caplog.records if "are ignored" in r.getMessage()] == [
        f"{root / 'train'}: 2 files in class folders are not images Pillow reads and are ignored: "
        "cat/labels.csv, cat/notes.txt"]


def test_class_names_come_from_the_sorted_folders_and_fill_the_config(tmp_path):
    root = tiny_folders(tmp_path, ("zebra", "Ünïcode square", "a b"))
    config = config_for(root)
    assert config.task.class_names is None and config.model.num_classes is None
    train, val = folder_cls.build_datasets(config)
    assert config.task.class_names == ["a b", "zebra", "Ünïcode square"] and config.model.num_classes == 3
    assert [(item.where.split("/")[-2], item.label) for item in val] == [("a b", 0), ("zebra", 1), ("Ünïcode square", 2)]


def test_saved_class_names_load_back_as_the_same_strings(tmp_path):
    # YAML would read some folder names as other types (null, 1, yes) if config.yaml wrote them bare.
    config = config_for(tmp_path, "output_dir=x")
    config.task.class_names = ["1", "null", "yes", "a: b", "Ünïcode square", "-x"]
    save_config(config, tmp_path / "run")
    reloaded = load_config(folder_cls.FolderClsConfig, tmp_path / "run" / "config.yaml")
    assert reloaded.task.class_names == ["1", "null", "yes", "a: b", "Ünïcode square", "-x"]


@pytest.mark.parametrize("remove, named", [("train", "train"), ("val", "val")])
def test_a_missing_split_is_an_error_naming_it(tmp_path, remove, named, capsys):
    import shutil

    from rs_transfer.cli import main

    root = tiny_folders(tmp_path / "data")
    shutil.rmtree(root / remove)
    assert main(["finetune", "--task", "folder_cls", "--config", str(DEMO), f"data.root={root}",
                 f"output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: missing {root / named}: expected {root / named}/<class>/<images>")
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_split_without_class_folders_is_an_error_naming_it(tmp_path, split):
    root = tiny_folders(tmp_path)
    for folder in (root / split).iterdir():
        for image in folder.iterdir():
            image.rename(root / split / image.name)  # loose images, no class folder
        folder.rmdir()
    with pytest.raises(DataError, match=re.escape(f"{root / split} holds ") + r"\d+ images directly in it, and no "
                                        r"class folder .*move them into their class folders"):
        folder_cls.build_datasets(config_for(root))


def _remove(root, piece):
    import shutil

    if piece == "one class":
        for name in ("dog", "empty class"):
            shutil.rmtree(root / "train" / name)
    elif piece.endswith("/loose"):  # the split's images lie loose in it, no class folder
        split = root / piece.split("/")[0]
        for folder in list(split.iterdir()):
            for image in folder.iterdir():
                image.rename(split / image.name)
            folder.rmdir()
    elif piece != "data.root":
        shutil.rmtree(root / piece)


@pytest.mark.parametrize("piece, error, message", [
    ("data.root", ConfigError, "data.root is not set: give data.root=DIR, the folder that holds train/<class>/"),
    ("train", DataError, "missing {root}/train: expected {root}/train/<class>/<images>"),
    ("val", DataError, "missing {root}/val: expected {root}/val/<class>/<images>"),
    ("train/loose", DataError, "{root}/train holds 2 images directly in it, and no class folder"),
    ("val/loose", DataError, "{root}/val holds 2 images directly in it, and no class folder"),
    ("one class", DataError, "{root}/train has one class folder ('cat'): classification needs at least two"),
])
def test_check_data_names_the_missing_piece_of_the_layout(tmp_path, piece, error, message):
    root = tiny_folders(tmp_path / "data")
    (root / "train" / "empty class").mkdir()  # passes: check_data lists no image (build does, and warns)
    folder_cls.check_data(config_for(root))
    config = config_for(root)
    _remove(root, piece)
    if piece == "data.root":
        config.data.root = None
    with pytest.raises(error, match=re.escape(message.format(root=root))):
        folder_cls.TASK.check_data(config)


def test_a_class_of_val_that_train_lacks_is_named(tmp_path):
    root = tiny_folders(tmp_path)
    write_image(root / "val" / "bird" / "x.png")
    with pytest.raises(DataError, match=re.escape(f"{root / 'val' / 'bird'}: class 'bird' of val/ is not a class "
                                                  "folder of train/")):
        folder_cls.build_datasets(config_for(root))


def test_a_class_folder_without_images_is_kept_with_its_index_and_named(tmp_path, caplog):
    root = tiny_folders(tmp_path, ("ant", "cat"))
    (root / "train" / "bee").mkdir()
    (root / "train" / "bee" / "readme.txt").write_text("no images yet")
    with caplog.at_level(logging.INFO, logger="rs_transfer.downstream.folder_cls"):
        config = config_for(root)
        train, val = folder_cls.build_datasets(config)
    assert config.task.class_names == ["ant", "bee", "cat"] and config.model.num_classes == 3
    assert sorted(item.label for item in train) == [0, 2] and sorted(item.label for item in val) == [0, 2]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("1 class folder(s) hold no image and keep their index" in m and m.endswith(": bee") for m in warnings)


def test_class_names_in_the_config_must_match_the_folders(tmp_path):
    root = tiny_folders(tmp_path)
    with pytest.raises(ConfigError, match=re.escape(f"task.class_names (2 names) disagrees with the 2 class folders "
                                                    f"of {root / 'train'}: only in task.class_names: cow; only in "
                                                    "the folders: dog")):
        folder_cls.build_datasets(config_for(root, "task.class_names=[cat,cow]"))
    with pytest.raises(ConfigError, match="the same names in another order"):
        folder_cls.build_datasets(config_for(root, "task.class_names=[dog,cat]"))
    config = config_for(root, "task.class_names=[cat,dog]")
    folder_cls.build_datasets(config)
    assert config.task.class_names == ["cat", "dog"]


def test_an_unreadable_image_is_skipped_and_named_and_all_unreadable_is_an_error(tmp_path, caplog):
    root = tiny_folders(tmp_path)
    bad = root / "train" / "cat" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    built = finetune.build_task(config_for(root, "task.image_size=8"))
    labels = [built.train_set[i][1] for i in range(len(built.train_set))]
    assert labels == [0, 0, 1]  # broken.jpg (index 0): the next image of the list stands in
    assert built.train_set.skipped == 1
    assert any(f"skipping unreadable image {bad}" in r.getMessage() for r in caplog.records)
    for image in (root / "val").rglob("*.jpg"):
        image.write_bytes(b"truncated")
    built = finetune.build_task(config_for(root, "task.image_size=8"))
    with pytest.raises(DataError, match=re.escape(f"unreadable images in a row from {root / 'val'}")):
        built.evaluate(built.model.eval())


def test_per_class_accuracy_and_top5_only_with_five_classes():
    scores = torch.tensor([[3.0, 2, 1], [3, 2, 1], [1, 3, 2], [1, 2, 3]])
    topk = TopK(3, torch.device("cpu"), per_class=True)
    topk.update(scores, torch.tensor([0, 1, 1, 1]))
    metrics = fractions(topk.counts(), ("a", "b b", "ü"))
    # class c has no sample: no accuracy; 3 classes: no top5 (always 1)
    assert metrics == {"top1": 0.5, "acc/a": 1.0, "acc/b b": 1 / 3}
    plain = TopK(3, torch.device("cpu"))
    plain.update(scores, torch.tensor([0, 1, 1, 1]))
    assert fractions(plain.counts()) == {"top1": 0.5, "top5": 1.0}  # cifar100, pretrain: unchanged


def test_build_model_needs_the_class_names_a_run_saves(tmp_path):
    config = config_for(tmp_path)
    with pytest.raises(ConfigError, match="task.class_names is not set"):
        folder_cls.build_model(config)
    config.task.class_names = ["a", "b", "c"]
    model = folder_cls.build_model(config).eval()
    with torch.no_grad():
        assert model({"image": torch.zeros(2, 3, 32, 32, dtype=torch.uint8)}).shape == (2, 3)


def test_synthetic_folders_use_spaces_unicode_and_mixed_case_extensions(tmp_path):
    root = folder_cls.write_synthetic(tmp_path, 12, 6)
    assert sorted(p.name for p in (root / "train").iterdir()) == NAMES
    suffixes = {p.suffix for p in (root / "train").rglob("img_*")}
    assert suffixes == {".JPG", ".png", ".jpeg", ".PNG"}
    modes, sizes = set(), set()
    for path in (root / "train").rglob("img_*"):
        with Image.open(path) as image:
            modes.add(image.mode)
            sizes.update(image.size)
    assert modes == {"RGB", "P"} and 40 <= min(sizes) and max(sizes) <= 96
