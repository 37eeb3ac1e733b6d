"""Loaders on tiny datasets in the real on-disk formats, their awkward parts, layout errors, and transforms that
keep labels aligned with the image."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from rs_transfer.downstream import ade_seg, cifar100, nyu_depth, pascal_det, pascal_seg, segmentation
from rs_transfer.downstream.data import IGNORE
from rs_transfer.downstream.transforms import dense_train_transform
from rs_transfer.errors import DataError


def test_voc_seg_reads_palette_pngs_with_ignore_outlines(tmp_path):
    pascal_seg.write_voc_seg(tmp_path, train=3, val=2, size=(40, 56))
    png = tmp_path / "VOCdevkit/VOC2012/SegmentationClass/2007_000000.png"
    with Image.open(png) as label:
        assert label.mode == "P"  # as distributed: indices, with the VOC colour palette
    items = pascal_seg.voc_items(tmp_path, "train")
    data = segmentation.SegmentationSet(items, num_classes=21)
    sample = data[0]
    assert len(data) == 3 and sample["image"].shape == (3, 40, 56) and sample["image"].dtype == torch.uint8
    values = set(sample["mask"].unique().tolist())
    assert IGNORE in values and values <= {0, 1, 8, 15, IGNORE}  # class indices, not palette colours
    # data.root may also be the VOCdevkit folder or VOC2012 itself.
    assert len(pascal_seg.voc_items(tmp_path / "VOCdevkit", "val")) == 2
    assert len(pascal_seg.voc_items(tmp_path / "VOCdevkit/VOC2012", "val")) == 2


def test_voc_trainaug_merges_sbd_mat_labels_and_drops_val(tmp_path):
    pascal_seg.write_voc_seg(tmp_path / "voc", train=3, val=2, size=(40, 56))
    sbd = pascal_seg.write_sbd(tmp_path / "sbd", tmp_path / "voc", extra=4, size=(40, 56))
    items = pascal_seg.voc_items(tmp_path / "voc", "trainaug", sbd_root=sbd)
    ids = [image.stem for image, _ in items]
    assert len(ids) == 3 + 4 and "2007_000003" not in ids  # VOC val image listed by SBD is dropped
    sbd_item = next(i for i, (image, _) in enumerate(items) if image.stem.startswith("2008"))
    sample = segmentation.SegmentationSet(items, 21)[sbd_item]
    assert set(sample["mask"].unique().tolist()) <= {0, 1, 8, 15}
    with pytest.raises(DataError, match="sbd_root"):
        pascal_seg.voc_items(tmp_path / "voc", "trainaug")


def test_ade_shifts_labels_and_ignores_other(tmp_path):
    ade_seg.write_ade(tmp_path, train=2, val=1, size=(40, 56))
    items = ade_seg.ade_items(tmp_path, "train")
    mask = segmentation.SegmentationSet(items, 150)[0]["mask"]
    values = set(mask.unique().tolist())
    assert IGNORE in values  # raw 0 ("other")
    assert values - {IGNORE} <= {0, 2, 12, 149}  # raw 1, 3, 13, 150 shifted by -1
    assert (mask[:4] == IGNORE).all()  # the band the writer labels 0


def test_cifar100_pickles(tmp_path):
    cifar100.write_cifar100(tmp_path, train=20, test=10)
    data = cifar100.Cifar100(tmp_path, "train", cifar100.transforms(48, train=False))
    sample = data[3]
    assert len(data) == 20 and sample["image"].shape == (3, 48, 48) and sample["label"].item() == 30
    raw = cifar100.read_cifar(tmp_path, "test")[0]
    assert raw.shape == (10, 3, 32, 32) and raw.dtype == np.uint8


@pytest.mark.parametrize("case", ["no_root", "no_voc", "no_split", "no_png", "bad_label"])
def test_wrong_layouts_name_the_missing_file(tmp_path, case):
    pascal_seg.write_voc_seg(tmp_path, train=2, val=1, size=(24, 24))
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
    with pytest.raises(DataError, match=match):
        items = pascal_seg.voc_items(root, "train")
        segmentation.SegmentationSet(items, 21)[0]


def test_cifar_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="cifar-100-python"):
        cifar100.read_cifar(tmp_path, "train")
    (tmp_path / "cifar-100-python").mkdir()
    (tmp_path / "cifar-100-python/train").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="train is not a CIFAR-100 pickle"):
        cifar100.read_cifar(tmp_path, "train")


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


def test_voc_detection_xml_difficult_and_empty_images(tmp_path):
    pascal_det.write_voc_det(tmp_path, train=6, test=4, size=(40, 56))
    items = pascal_det.image_sets(tmp_path, ["2007:trainval", "2012:trainval"])
    assert len(items) == 6 and {i[2].split("/")[0] for i in items} == {"2007", "2012"}
    test = pascal_det.VOCDetection(pascal_det.image_sets(tmp_path, ["2007:test"]))
    empty = test[0]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)
    # An XML written by hand: 1-based inclusive pixels become continuous boxes; difficult is read.
    xml = tmp_path / "VOCdevkit/VOC2007/Annotations/test000001.xml"
    xml.write_text(pascal_det._voc_xml("test000001.jpg", "2007", 40, 56, [("cat", (4, 5, 20, 30), True),
                                                                          ("person", (0, 0, 56, 40), False)]))
    boxes, labels, difficult = pascal_det.parse_annotation(xml)
    assert boxes.tolist() == [[4, 5, 20, 30], [0, 0, 56, 40]]
    assert [pascal_det.CLASSES[i] for i in labels] == ["cat", "person"] and difficult.tolist() == [True, False]
    train_view = pascal_det.VOCDetection(pascal_det.image_sets(tmp_path, ["2007:test"]), keep_difficult=False)[1]
    assert train_view["labels"].tolist() == [pascal_det.CLASSES.index("person")]
    xml.write_text(xml.read_text().replace("<name>cat</name>", "<name>kitten</name>"))
    with pytest.raises(DataError, match="test000001.xml: unknown class 'kitten'"):
        pascal_det.parse_annotation(xml)
    with pytest.raises(DataError, match="Pascal VOC 2012"):
        pascal_det.image_sets(tmp_path / "VOCdevkit/VOC2007", ["2012:trainval"])


def test_detection_transform_moves_boxes_with_the_image():
    # A white rectangle on black: after jitter, crop and flip, each box must still frame the white pixels.
    from rs_transfer.downstream.detection import train_transform

    torch.manual_seed(0)
    image = torch.zeros(3, 60, 80, dtype=torch.uint8)
    image[:, 10:30, 20:60] = 255
    transform = train_transform(48, (0.5, 2.0))
    for _ in range(10):
        sample = {"image": tv_tensors.Image(image), "labels": torch.tensor([3]), "difficult": torch.tensor([False]),
                  "boxes": tv_tensors.BoundingBoxes([[20, 10, 60, 30]], format="XYXY", canvas_size=(60, 80))}
        out = transform(sample)
        assert out["image"].shape == (3, 48, 48)
        assert len(out["boxes"]) == len(out["labels"]) == len(out["difficult"])
        white = (out["image"][0] > 127).nonzero()
        if len(out["boxes"]) == 0:
            assert len(white) < 4
            continue
        x0, y0, x1, y1 = out["boxes"][0].tolist()
        assert abs(white[:, 1].min() - x0) <= 1 and abs(white[:, 1].max() + 1 - x1) <= 1
        assert abs(white[:, 0].min() - y0) <= 1 and abs(white[:, 0].max() + 1 - y1) <= 1


def test_nyu_h5_and_bts_layouts(tmp_path):
    nyu_depth.write_nyu_h5(tmp_path / "h5", train=3, val=2, size=(48, 64))
    train = nyu_depth.NYUDepth(tmp_path / "h5", "train")
    sample = train[0]
    assert train.format == "h5" and len(train) == 3 and len(nyu_depth.NYUDepth(tmp_path / "h5", "val")) == 2
    assert sample["image"].shape == (3, 48, 64) and sample["image"].dtype == torch.uint8
    assert sample["depth"].dtype == torch.float32 and 0.9 < sample["depth"][sample["depth"] > 0].min() < 8.1
    nyu_depth.write_nyu_bts(tmp_path / "bts", train=3, val=2, size=(48, 64))
    with Image.open(next((tmp_path / "bts/sync").rglob("sync_depth_*.png"))) as png:
        assert np.array(png).dtype == np.uint16  # 16-bit millimetres, as distributed
    bts = nyu_depth.NYUDepth(tmp_path / "bts", "val")
    assert bts.format == "bts" and len(bts) == 2  # the line with depth "None" is skipped
    d = bts[0]["depth"]
    assert d.dtype == torch.float32 and 0.9 < d[d > 0].min() and d.max() < 8.1  # millimetres -> metres
    with pytest.raises(DataError, match="nyudepthv2_train_files_with_gt.txt: expected the BTS file list"):
        nyu_depth.NYUDepth(tmp_path / "h5", "train", fmt="bts")
    with pytest.raises(DataError, match="expected an HDF5 file with 'rgb'"):
        bad = tmp_path / "h5/nyudepthv2/train/scene_0000/00000.h5"
        bad.write_bytes(b"junk")
        train[0]


def test_eigen_crop_and_depth_range():
    gt = torch.full((1, 480, 640), 5.0)
    gt[0, 100, 100] = 20.0  # beyond depth_max
    gt[0, 200, 200] = 0.0  # no measurement
    valid = nyu_depth.eval_mask(gt, 1e-3, 10.0, True, [(480, 640)])
    assert valid.sum() == (471 - 45) * (601 - 41) - 2
    assert not valid[0, 44, 300] and valid[0, 45, 300] and not valid[0, 300, 601]
