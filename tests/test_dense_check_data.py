"""check_data of the dense tasks (pascal_seg, ade_seg, folder_seg, nyu_depth): the layout checked before torch is
loaded, on empty folders and files in each task's real layout (nothing is opened), one missing piece at a time."""

import dataclasses
import shutil
from pathlib import Path

import pytest

from rs_transfer.config import ConfigError, load_config
from rs_transfer.downstream import registry
from rs_transfer.errors import DataError

VOC = "VOCdevkit/VOC2012"
SBD = "sbd/benchmark_RELEASE/dataset"
ADE = "ADEChallengeData2016"
BTS_TRAIN, BTS_TEST = "nyudepthv2_train_files_with_gt.txt", "nyudepthv2_test_files_with_gt.txt"

# task -> the folders and files of its complete layout under data.root (a trailing "/" marks a folder)
LAYOUTS = {
    "pascal_seg": (f"{VOC}/JPEGImages/", f"{VOC}/SegmentationClass/", f"{VOC}/ImageSets/Segmentation/train.txt",
                   f"{VOC}/ImageSets/Segmentation/val.txt", f"{SBD}/train.txt", f"{SBD}/val.txt"),
    "ade_seg": tuple(f"{ADE}/{kind}/{split}/" for kind in ("images", "annotations")
                     for split in ("training", "validation")),
    "folder_seg": ("images/train/", "images/val/", "masks/train/", "masks/val/"),
    "nyu_depth": ("nyudepthv2/train/", "nyudepthv2/val/"),
    "nyu_bts": (BTS_TRAIN, BTS_TEST, "sync/", "official_splits/test/"),
}


def make_layout(root: Path, layout: str) -> Path:
    for entry in LAYOUTS[layout]:
        path = root / entry
        if entry.endswith("/"):
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("2007_000032\n")
    return root


def config_of(task: str, root, *overrides):
    return load_config(registry.get(task).config, None, [f"data.root={root}", *overrides])


def remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() else path.unlink()


@pytest.mark.parametrize("task, layout, overrides", [
    ("pascal_seg", "pascal_seg", ()),
    ("pascal_seg", "pascal_seg", ("task.train_split=trainaug", "task.sbd_root={root}/sbd")),
    ("ade_seg", "ade_seg", ()),
    ("folder_seg", "folder_seg", ()),
    ("nyu_depth", "nyu_depth", ()),
    ("nyu_depth", "nyu_bts", ()),
])
def test_a_complete_layout_passes_and_the_config_is_left_as_it_was(task, layout, overrides, tmp_path):
    config = config_of(task, make_layout(tmp_path, layout), *(o.format(root=tmp_path) for o in overrides))
    before = dataclasses.asdict(config)
    assert registry.get(task).check_data(config) is None
    assert dataclasses.asdict(config) == before  # folder_seg's model.num_classes is build's to fill


@pytest.mark.parametrize("task", ["pascal_seg", "ade_seg", "folder_seg", "nyu_depth"])
def test_data_root_unset_is_a_config_error(task):
    with pytest.raises(ConfigError, match="data.root"):
        registry.get(task).check_data(load_config(registry.get(task).config, None, []))


# (task, layout, removed (relative to data.root) or None, overrides, classes.txt or None, the error's type and text)
MISSING = [
    ("pascal_seg", "pascal_seg", VOC, (), None, DataError, "VOC2012"),
    ("pascal_seg", "pascal_seg", f"{VOC}/JPEGImages", (), None, DataError, "VOC2012/JPEGImages"),
    ("pascal_seg", "pascal_seg", f"{VOC}/SegmentationClass", (), None, DataError, "VOC2012/SegmentationClass"),
    ("pascal_seg", "pascal_seg", f"{VOC}/ImageSets/Segmentation/train.txt", (), None, DataError,
     "Segmentation/train.txt"),
    ("pascal_seg", "pascal_seg", None, ("task.val_split=trainval",), None, DataError, "Segmentation/trainval.txt"),
    ("pascal_seg", "pascal_seg", None, ("task.train_split=trainaug",), None, DataError, "task.sbd_root"),
    ("pascal_seg", "pascal_seg", "sbd/benchmark_RELEASE", ("task.train_split=trainaug", "task.sbd_root={root}/sbd"),
     None, DataError, "SBD"),
    ("pascal_seg", "pascal_seg", f"{SBD}/val.txt", ("task.train_split=trainaug", "task.sbd_root={root}/sbd"), None,
     DataError, "dataset/val.txt"),
    ("ade_seg", "ade_seg", f"{ADE}/images/training", (), None, DataError, "images/training"),
    ("ade_seg", "ade_seg", f"{ADE}/annotations/validation", (), None, DataError, "annotations/validation"),
    ("folder_seg", "folder_seg", "images/train", (), None, DataError, "images/train"),
    ("folder_seg", "folder_seg", "masks/val", (), None, DataError, "masks/val"),
    ("folder_seg", "folder_seg", None, (), "cat\n\ndog\n", DataError, "classes.txt line 2 is blank"),
    ("folder_seg", "folder_seg", None, ("task.class_names=[cat,bird]",), "cat\ndog\n", ConfigError, "classes.txt"),
    ("folder_seg", "folder_seg", None, ("model.num_classes=3",), "cat\ndog\n", ConfigError, "model.num_classes=3"),
    ("nyu_depth", "nyu_depth", "nyudepthv2/val", (), None, DataError, "nyudepthv2/val"),
    ("nyu_depth", "nyu_depth", None, ("task.nyu_format=bts",), None, DataError, BTS_TRAIN),
    ("nyu_depth", "nyu_bts", BTS_TEST, (), None, DataError, BTS_TEST),
    ("nyu_depth", "nyu_bts", "sync", (), None, DataError, "sync"),
    ("nyu_depth", "nyu_bts", "official_splits/test", (), None, DataError, "official_splits/test"),
]


@pytest.mark.parametrize("task, layout, removed, overrides, classes, error, names", MISSING)
def test_a_missing_piece_is_named(task, layout, removed, overrides, classes, error, names, tmp_path):
    root = make_layout(tmp_path, layout)
    if removed:
        remove(root / removed)
    if classes:
        (root / "classes.txt").write_text(classes)
    config = config_of(task, root, *(o.format(root=tmp_path) for o in overrides))
    with pytest.raises(error) as raised:
        registry.get(task).check_data(config)
    assert names in str(raised.value)
