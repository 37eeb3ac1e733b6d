"""pascal_det's torch-free layout check (`check_data`): each missing piece of the VOC layout is one error naming it.
The task's data, model, TTA and end-to-end tests are in test_downstream_data.py, test_downstream_models.py,
test_predict.py and test_downstream_e2e.py."""

import shutil
from pathlib import Path

import pytest

from rs_transfer.config import ConfigError
from rs_transfer.downstream.pascal_det import TASK
from rs_transfer.errors import DataError


def voc_layout(root: Path) -> Path:
    """The folders and split files of VOCdevkit/VOC2007 (trainval, test) and VOC2012 (trainval), no image."""
    for year, splits in (("2007", ("trainval", "test")), ("2012", ("trainval",))):
        voc = root / "VOCdevkit" / f"VOC{year}"
        for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
            (voc / folder).mkdir(parents=True)
        for split in splits:
            (voc / "ImageSets/Main" / f"{split}.txt").write_text(f"{year}_000001\n")
    return root


def config_of(root, *sets):
    config = TASK.config()
    config.data.root = None if root is None else str(root)
    if sets:
        config.task.det_train_sets, config.task.det_test_set = list(sets[:-1]), sets[-1]
    return config


# (what is removed or set, the error's type, what the error names)
MISSING = [
    ("data.root", ConfigError, r"data.root is not set"),
    ("VOCdevkit/VOC2012", DataError, r"Pascal VOC 2012 \(a VOC2012 folder\) not found under data.root=.*VOCdevkit/VOC2012"),
    ("VOCdevkit/VOC2007/ImageSets/Main/trainval.txt", DataError, r"missing .*VOC2007/ImageSets/Main/trainval.txt"),
    ("VOCdevkit/VOC2007/ImageSets/Main/test.txt", DataError, r"missing .*VOC2007/ImageSets/Main/test.txt"),
    ("VOCdevkit/VOC2012/Annotations", DataError, r"missing .*VOC2012/Annotations: expected VOC2012/Annotations/"),
    ("VOCdevkit/VOC2007/JPEGImages", DataError, r"missing .*VOC2007/JPEGImages: expected VOC2007/JPEGImages/"),
    ("task.det_test_set=2007test", DataError, r"bad image set '2007test': expected YEAR:SPLIT"),
]


@pytest.mark.parametrize("piece, error, message", MISSING, ids=[piece for piece, _, _ in MISSING])
def test_check_data_names_each_missing_piece_of_the_voc_layout(tmp_path, piece, error, message):
    TASK.check_data(config_of(voc_layout(tmp_path)))  # the whole layout passes
    if piece == "data.root":
        config = config_of(None)
    elif piece.startswith("task."):
        config = config_of(tmp_path, "2007:trainval", piece.partition("=")[2])
    else:
        target = tmp_path / piece
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink()
        config = config_of(tmp_path)
    with pytest.raises(error, match=message):
        TASK.check_data(config)
