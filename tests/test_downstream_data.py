"""Loaders on tiny datasets in the real on-disk formats, their awkward parts, layout errors, and transforms that
keep labels aligned with the image."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from rs_transfer.downstream import classification, segmentation, synthetic
from rs_transfer.downstream.data import IGNORE, DatasetError, dense_train_transform


def test_voc_seg_reads_palette_pngs_with_ignore_outlines(tmp_path):
    synthetic.write_voc_seg(tmp_path, train=3, val=2, size=(40, 56))
    png = tmp_path / "VOCdevkit/VOC2012/SegmentationClass/2007_000000.png"
    with Image.open(png) as label:
        assert label.mode == "P"  # as distributed: indices, with the VOC colour palette
    items = segmentation.voc_items(tmp_path, "train")
    data = segmentation.SegmentationSet(items, num_classes=21)
    sample = data[0]
    assert len(data) == 3 and sample["image"].shape == (3, 40, 56) and sample["image"].dtype == torch.uint8
    values = set(sample["mask"].unique().tolist())
    assert IGNORE in values and values <= {0, 1, 8, 15, IGNORE}  # class indices, not palette colours
    # data.root may also be the VOCdevkit folder or VOC2012 itself.
    assert len(segmentation.voc_items(tmp_path / "VOCdevkit", "val")) == 2
    assert len(segmentation.voc_items(tmp_path / "VOCdevkit/VOC2012", "val")) == 2


def test_voc_trainaug_merges_sbd_mat_labels_and_drops_val(tmp_path):
    synthetic.write_voc_seg(tmp_path / "voc", train=3, val=2, size=(40, 56))
    sbd = synthetic.write_sbd(tmp_path / "sbd", tmp_path / "voc", extra=4, size=(40, 56))
    items = segmentation.voc_items(tmp_path / "voc", "trainaug", sbd_root=sbd)
    ids = [image.stem for image, _ in items]
    assert len(ids) == 3 + 4 and "2007_000003" not in ids  # VOC val image listed by SBD is dropped
    sbd_item = next(i for i, (image, _) in enumerate(items) if image.stem.startswith("2008"))
    sample = segmentation.SegmentationSet(items, 21)[sbd_item]
    assert set(sample["mask"].unique().tolist()) <= {0, 1, 8, 15}
    with pytest.raises(DatasetError, match="sbd_root"):
        segmentation.voc_items(tmp_path / "voc", "trainaug")


def test_ade_shifts_labels_and_ignores_other(tmp_path):
    synthetic.write_ade(tmp_path, train=2, val=1, size=(40, 56))
    items = segmentation.ade_items(tmp_path, "train")
    mask = segmentation.SegmentationSet(items, 150)[0]["mask"]
    values = set(mask.unique().tolist())
    assert IGNORE in values  # raw 0 ("other")
    assert values - {IGNORE} <= {0, 2, 12, 149}  # raw 1, 3, 13, 150 shifted by -1
    assert (mask[:4] == IGNORE).all()  # the band the writer labels 0


def test_cifar100_pickles(tmp_path):
    synthetic.write_cifar100(tmp_path, train=20, test=10)
    data = classification.Cifar100(tmp_path, "train", classification.transforms(48, train=False))
    sample = data[3]
    assert len(data) == 20 and sample["image"].shape == (3, 48, 48) and sample["label"].item() == 30
    raw = classification.read_cifar(tmp_path, "test")[0]
    assert raw.shape == (10, 3, 32, 32) and raw.dtype == np.uint8


@pytest.mark.parametrize("case", ["no_root", "no_voc", "no_split", "no_png", "bad_label"])
def test_wrong_layouts_name_the_missing_file(tmp_path, case):
    synthetic.write_voc_seg(tmp_path, train=2, val=1, size=(24, 24))
    voc = tmp_path / "VOCdevkit/VOC2012"
    root = tmp_path
    if case == "no_root":
        root, match = tmp_path / "nowhere", "Pascal VOC 2012 .*not found.*nowhere"
    elif case == "no_voc":
        root, match = tmp_path / "VOCdevkit/VOC2012/JPEGImages", "JPEGImages"
    elif case == "no_split":
        (voc / "ImageSets/Segmentation/train.txt").unlink()
        match = "train.txt: expected one image id per line"
    elif case == "no_png":
        (voc / "SegmentationClass/2007_000000.png").unlink()
        match = "2007_000000.png: expected a label PNG"
    else:
        Image.fromarray(np.full((24, 24), 40, dtype=np.uint8)).save(voc / "SegmentationClass/2007_000000.png")
        match = "has class 40: expected 0..20 or 255"
    with pytest.raises(DatasetError, match=match):
        items = segmentation.voc_items(root, "train")
        segmentation.SegmentationSet(items, 21)[0]


def test_cifar_errors_name_the_file(tmp_path):
    with pytest.raises(DatasetError, match="cifar-100-python"):
        classification.read_cifar(tmp_path, "train")
    (tmp_path / "cifar-100-python").mkdir()
    (tmp_path / "cifar-100-python/train").write_bytes(b"not a pickle")
    with pytest.raises(DatasetError, match="train is not a CIFAR-100 pickle"):
        classification.read_cifar(tmp_path, "train")


def test_scale_jitter_crop_flip_keep_mask_and_depth_aligned():
    # The image's red channel encodes the class (60 per class) and green the depth (30 per metre), so the label
    # read back off each transformed pixel must equal the transformed mask and depth there. The bilinear,
    # antialiased image blurs edges, so "read back" means nearest label value. Torchvision's own ScaleJitter
    # (NEAREST for masks) fails this: its labels sit up to half a pixel off the image.
    torch.manual_seed(0)
    mask = torch.zeros(60, 80, dtype=torch.uint8)
    mask[10:40, 20:70] = 3
    depth = torch.where(mask == 3, torch.tensor(2.0), torch.tensor(6.0))
    image = torch.zeros(3, 60, 80, dtype=torch.uint8)
    image[0] = mask * 60
    image[1] = (depth * 30).to(torch.uint8)
    transform = dense_train_transform(48, (0.5, 2.0), {tv_tensors.Image: 0, tv_tensors.Mask: IGNORE})
    for _ in range(10):
        out = transform({"image": tv_tensors.Image(image), "mask": tv_tensors.Mask(mask), "depth": tv_tensors.Mask(depth)})
        img, m, d = out["image"].float(), out["mask"], out["depth"]
        assert img.shape == (3, 48, 48) and m.shape == (48, 48) and d.shape == (48, 48)
        inside = m != IGNORE
        # Wrong = nearer the other label's value than its own (an exact tie, 90 of 0 vs 180, is an edge on the
        # pixel boundary and counts as right).
        wrong_class = ((img[0] - m.float() * 60).abs() > 90) & inside
        wrong_depth = (img[1] - d * 30).abs() > 60
        assert wrong_class.sum() <= 3 and (wrong_depth & inside).sum() <= 3
        assert (img[:, ~inside] == 0).all()  # padding: black image where the label is ignore
