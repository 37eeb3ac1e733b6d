"""Dataset files as they arrive from elsewhere: lists written on Windows (BOM, CRLF), webdataset keys with dots,
crafted and re-saved CIFAR pickles, SBD labels one pixel wide, evaluations with nothing to evaluate."""

import io
import logging
import os
import pickle
import struct
import tarfile
from types import SimpleNamespace

import numpy as np
from PIL import Image
import pytest
import torch
from torch import nn

from rs_transfer.downstream import cifar100, nyu_depth, pascal_det, pascal_seg, segmentation
from rs_transfer.errors import DataError
from rs_transfer.pretrain import data
from rs_transfer.pretrain.synthetic import make_image

BOM = "\ufeff"


def rewrite_windows(path) -> None:
    """Rewrite a text file as Windows tools save it: a UTF-8 byte-order mark and CRLF line endings."""
    lines = path.read_text().splitlines()
    path.write_bytes((BOM + "\r\n".join(lines) + "\r\n").encode())


def write_tar(path, members: list) -> None:
    """members: [(name, bytes)] in this order, as regular files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def jpeg(label: int = 0) -> bytes:
    buffer = io.BytesIO()
    make_image(label, 4, (12, 10), np.random.default_rng(label)).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_voc_segmentation_and_sbd_lists_written_on_windows(tmp_path):
    pascal_seg.write_voc_seg(tmp_path / "voc", train=3, val=2, size=(24, 32))
    sbd = pascal_seg.write_sbd(tmp_path / "sbd", tmp_path / "voc", extra=4, size=(24, 32))
    sets = tmp_path / "voc/VOCdevkit/VOC2012/ImageSets/Segmentation"
    for path in (sets / "train.txt", sets / "val.txt", sbd / "dataset/train.txt", sbd / "dataset/val.txt"):
        rewrite_windows(path)
    items = pascal_seg.voc_items(tmp_path / "voc", "train")
    assert [image.stem for image, _ in items] == ["2007_000000", "2007_000001", "2007_000002"]
    assert segmentation.SegmentationSet(items, 21)[0]["image"].shape == (3, 24, 32)  # the first id's files exist
    trainaug = [image.stem for image, _ in pascal_seg.voc_items(tmp_path / "voc", "trainaug", sbd_root=sbd)]
    # SBD's lists name 2008_000000..3 and VOC val's first id 2007_000003, which must still be dropped.
    assert trainaug == ["2007_000000", "2007_000001", "2007_000002",
                        "2008_000000", "2008_000001", "2008_000002", "2008_000003"]


def test_voc_detection_lists_and_annotations_written_on_windows(tmp_path):
    pascal_det.write_voc_det(tmp_path, train=4, test=3, size=(24, 32))
    voc = tmp_path / "VOCdevkit/VOC2007"
    rewrite_windows(voc / "ImageSets/Main/test.txt")
    rewrite_windows(voc / "Annotations/test000001.xml")
    test = pascal_det.VOCDetection(pascal_det.image_sets(tmp_path, ["2007:test"]))
    assert [item[2] for item in test.items] == ["2007/test000000", "2007/test000001", "2007/test000002"]
    boxes, labels, _ = pascal_det.parse_annotation(voc / "Annotations/test000001.xml")
    assert test[1]["boxes"].tolist() == boxes.tolist() and test[1]["labels"].tolist() == labels.tolist()


def test_nyu_bts_file_lists_written_on_windows(tmp_path):
    root = nyu_depth.write_nyu_bts(tmp_path, train=2, val=2, size=(24, 32))
    rewrite_windows(root / nyu_depth.BTS_LISTS["train"])
    rewrite_windows(root / nyu_depth.BTS_LISTS["val"])
    train = nyu_depth.NYUDepth(root, "train")
    assert train.format == "bts" and [rgb.name for rgb, _ in train.items] == ["rgb_00000.jpg", "rgb_00001.jpg"]
    assert train[0]["image"].shape == (3, 24, 32)
    assert len(nyu_depth.NYUDepth(root, "val")) == 2  # the "None" line is still skipped


def test_text_list_that_is_not_utf8_names_the_file(tmp_path):
    pascal_seg.write_voc_seg(tmp_path, train=2, val=1, size=(24, 24))
    (tmp_path / "VOCdevkit/VOC2012/ImageSets/Segmentation/train.txt").write_bytes(b"2007_\xff000000\n")
    with pytest.raises(DataError, match=r"train.txt is not UTF-8 text"):
        pascal_seg.voc_items(tmp_path, "train")


def test_shard_labels_written_on_windows(tmp_path):
    write_tar(tmp_path / "train/shard-00000.tar", [("a.jpg", jpeg()), ("a.cls", (BOM + "3\r\n").encode()),
                                                   ("b.jpg", jpeg()), ("b.cls", b"1\n")])
    items = data.scan_shards(sorted((tmp_path / "train").glob("*.tar")))
    assert [(item.ref, item.label) for item in items] == [("shard-00000.tar/a", 3), ("shard-00000.tar/b", 1)]


def test_shard_members_webdataset_does_not_pair_are_named_not_dropped_silently(tmp_path, caplog):
    members = []
    for i in range(10):
        # webdataset's key ends at the first dot: "img.2021.05.01_0007.jpg" is key "img", extension
        # "2021.05.01_0007.jpg", so these four samples have no image member under the rule.
        key = f"img.2021.05.01_{i:04d}" if i % 3 == 0 else f"sample_{i:04d}"
        members += [(f"{key}.jpg", jpeg(i % 4)), (f"{key}.cls", str(i % 4).encode())]
    members += [("orphan.cls", b"2"), ("README", b"no dot, no key")]
    shard = tmp_path / "shard-00000.tar"
    write_tar(shard, members)
    with caplog.at_level(logging.WARNING, logger="rs_transfer.pretrain.data"):
        items = data.scan_shards([shard])
    assert [item.ref for item in items] == [f"shard-00000.tar/sample_{i:04d}" for i in (1, 2, 4, 5, 7, 8)]
    assert [item.label for item in items] == [1, 2, 0, 1, 3, 0]
    messages = [r.getMessage() for r in caplog.records]
    per_shard = [m for m in messages if str(shard) in m]
    assert len(per_shard) == 1 and "10 member(s) not used" in per_shard[0]
    assert "img.2021.05.01_0000.jpg" in per_shard[0] and "key 'img'" in per_shard[0]
    assert "and 5 more" in per_shard[0]  # five named, the count gives the rest
    assert any("10 member(s) of 1 tar shard(s) were not used" in m for m in messages)


def test_a_sample_with_two_images_is_an_error_naming_shard_and_key(tmp_path):
    shard = tmp_path / "shard-00007.tar"
    write_tar(shard, [("x/k1.jpg", jpeg()), ("x/k1.png", jpeg()), ("x/k1.cls", b"0")])
    with pytest.raises(data.DataError, match=r"shard-00007.tar: sample 'x/k1' holds two images, x/k1.jpg and x/k1.png"):
        data.scan_shards([shard])
    write_tar(shard, [("k1.jpg", jpeg()), ("k1.cls", b"0"), ("k1.cls", b"1")])  # appended twice
    with pytest.raises(data.DataError, match=r"shard-00007.tar: sample 'k1' holds two labels, k1.cls and k1.cls"):
        data.scan_shards([shard])


def test_unlabelled_shards_name_members_without_an_image(tmp_path, caplog):
    shard = tmp_path / "unlabelled.tar"
    write_tar(shard, [("a.jpg", jpeg()), ("a.json", b"{}"), ("b.cls", b"1")])
    with caplog.at_level(logging.WARNING, logger="rs_transfer.pretrain.data"):
        items = data.list_images(shard)
    assert [(item.ref, item.label) for item in items] == [("unlabelled.tar/a", -1)]
    assert any("1 member(s) not used: b.cls" in r.getMessage() for r in caplog.records)  # a.json is a.jpg's field


class RunsCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class RunsPython:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


@pytest.mark.parametrize("payload, named", [(RunsCommand, "posix.system"), (RunsPython, "__builtin__.exec")])
def test_crafted_cifar_pickle_runs_nothing_and_is_refused(tmp_path, payload, named):
    # Protocol 2 writes Python 2's module names (__builtin__), which the refusal names as found.
    marker = tmp_path / "ran"
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    (folder / "train").write_bytes(pickle.dumps({b"data": payload(marker), b"fine_labels": [0]}, protocol=2))
    with pytest.raises(DataError, match=rf"cifar-100-python/train is not a CIFAR-100 pickle.*names {named}"):
        cifar100.read_cifar(tmp_path, "train")
    assert not marker.exists()


@pytest.mark.parametrize("declared", [
    b"\x8e" + (1 << 44).to_bytes(8, "little"),  # BINBYTES8: 16 TiB of bytes, 5 bytes present
    b"B" + (1 << 31).to_bytes(4, "little"),  # BINBYTES: 2 GiB
    b"\x8d" + (1 << 40).to_bytes(8, "little"),  # BINUNICODE8: 1 TiB of text
])
def test_a_cifar_pickle_declaring_more_bytes_than_it_holds_is_refused_before_allocating(tmp_path, declared):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    (folder / "train").write_bytes(b"\x80\x04" + declared + b"12345.")
    with pytest.raises(DataError, match=r"cifar-100-python/train is not a CIFAR-100 pickle.*UnpicklingError: it "
                                        r"declares a value of \d+ bytes where 6 are left in the file"):
        cifar100.read_cifar(tmp_path, "train")


def python2_cifar_pickle(pixels: np.ndarray, labels: list) -> bytes:
    """The bytes Python 2's cPickle wrote for a CIFAR file (protocol 2): byte-string keys, and the array rebuilt
    by numpy.core.multiarray._reconstruct with its state as a tuple of Python 2 strings (no _codecs)."""
    def string(b: bytes) -> bytes:
        return b"U" + bytes([len(b)]) + b  # SHORT_BINSTRING

    def small(n: int) -> bytes:
        return b"K" + bytes([n])  # BININT1

    def integer(n: int) -> bytes:
        return b"J" + struct.pack("<i", n)  # BININT

    dtype = (b"cnumpy\ndtype\n" + string(b"u1") + small(0) + small(1) + b"\x87R"
             + b"(" + small(3) + string(b"|") + b"NNN" + integer(-1) + integer(-1) + small(0) + b"tb")
    array = (b"cnumpy.core.multiarray\n_reconstruct\n" + b"cnumpy\nndarray\n" + small(0) + b"\x85" + string(b"b")
             + b"\x87R" + b"(" + small(1) + integer(pixels.shape[0]) + integer(pixels.shape[1]) + b"\x86" + dtype
             + b"\x89" + b"T" + struct.pack("<I", pixels.nbytes) + pixels.tobytes() + b"tb")
    label_list = b"](" + b"".join(small(v) for v in labels) + b"e"
    return b"\x80\x02}(" + string(b"data") + array + string(b"fine_labels") + label_list + b"u."


@pytest.mark.parametrize("form", ["python2", "python3_str_keys", "python3_protocol5"])
def test_cifar_pickles_as_distributed_and_as_resaved(tmp_path, form):
    pixels = np.random.default_rng(0).integers(0, 256, size=(3, 3072), dtype=np.uint8)
    labels = [7, 0, 99]
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    if form == "python2":
        raw = python2_cifar_pickle(pixels, labels)
    else:
        protocol = 5 if form == "python3_protocol5" else 4
        raw = pickle.dumps({"data": pixels, "fine_labels": [np.int64(v) for v in labels], "filenames": ["a.png"]},
                           protocol=protocol)
    (folder / "test").write_bytes(raw)
    images, read_labels = cifar100.read_cifar(tmp_path, "test")
    assert images.shape == (3, 3, 32, 32) and np.array_equal(images.reshape(3, -1), pixels)
    assert read_labels.tolist() == labels


def test_sbd_labels_keep_their_shape_when_one_pixel_wide(tmp_path):
    from scipy.io import savemat

    column = np.array([[0], [15], [255]], dtype=np.uint8)  # 3 x 1
    normal = np.arange(20, dtype=np.uint8).reshape(4, 5)
    for name, label in (("column", column), ("normal", normal)):
        savemat(tmp_path / f"{name}.mat", {"GTcls": {"Segmentation": label, "CategoriesPresent": np.unique(label)}})
    assert pascal_seg.read_sbd_mat(tmp_path / "column.mat").tolist() == column.tolist()
    read = pascal_seg.read_sbd_mat(tmp_path / "normal.mat")
    assert read.dtype == np.uint8 and read.tolist() == normal.tolist()
    savemat(tmp_path / "flat.mat", {"GTcls": {"CategoriesPresent": np.array([1])}})
    with pytest.raises(DataError, match="flat.mat has no GTcls.Segmentation"):
        pascal_seg.read_sbd_mat(tmp_path / "flat.mat")


class ConstantDepth(nn.Module):
    def __init__(self, metres: float):
        super().__init__()
        self.metres = nn.Parameter(torch.tensor(metres))

    def forward(self, batch):
        return self.metres.expand(batch["image"].shape[0], *batch["image"].shape[-2:])


def test_nyu_evaluation_without_a_valid_pixel_is_an_error_not_zero(tmp_path):
    nyu_depth.write_nyu_h5(tmp_path, train=1, val=2, size=(48, 64))  # depths 1-8 m
    val = nyu_depth.NYUDepth(tmp_path, "val", "h5")
    t = SimpleNamespace(eval_batch_size=2, depth_min=1e-3, depth_max=10.0, eigen_crop=True, depth_average="images")
    assert nyu_depth.make_evaluator(val, t)(ConstantDepth(2.0))["pixels"] > 0
    t.depth_max = 0.5  # every ground-truth depth lies beyond it
    with pytest.raises(DataError, match=r"no ground-truth depth inside \(0.001, 0.5\) m and the Eigen crop "
                                           r"in 2 images"):
        nyu_depth.make_evaluator(val, t)(ConstantDepth(2.0))


def _unset_root_errors():
    """Each reader's path to data.root with the key unset: every transfer task, NYU's reader, pretraining, video."""
    from rs_transfer.config import load_config
    from rs_transfer.downstream import finetune, registry
    from rs_transfer.pretrain.config import PretrainConfig
    from rs_transfer.pretrain.task import build_datasets
    from rs_transfer.video.config import VideoConfig
    from rs_transfer.video.task import prepare_root

    cases = {task: (lambda task=task: finetune.build_task(finetune.make_config(task))) for task in registry.names()}
    cases["NYUDepth"] = lambda: nyu_depth.NYUDepth(None, "train")
    cases["pretrain"] = lambda: build_datasets(load_config(PretrainConfig))
    cases["video"] = lambda: prepare_root(load_config(VideoConfig))
    return cases


@pytest.mark.parametrize("reader", list(_unset_root_errors()))
def test_an_unset_data_root_is_one_config_error_of_one_shape_for_every_reader(reader):
    from rs_transfer.config import ConfigError

    with pytest.raises(ConfigError, match=r"^data\.root is not set: give data\.root=DIR, the folder that holds \S"):
        _unset_root_errors()[reader]()


def _image(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(path)


@pytest.mark.parametrize("reader", ["pretrain", "folder_cls"])
def test_a_half_sorted_val_is_an_error_and_a_stray_image_a_warning(tmp_path, caplog, reader):
    # an interrupted ImageNet valprep.sh: some class folders done, the other images still flat beside them
    from rs_transfer.downstream.folder_cls import list_split
    from rs_transfer.pretrain.data import scan_folder

    read = scan_folder if reader == "pretrain" else list_split
    val = tmp_path / "val"
    for i in range(8):
        _image(val / f"n0{i % 2}" / f"ILSVRC2012_val_{i:08d}.JPEG")
    for i in range(8, 20):
        _image(val / f"ILSVRC2012_val_{i:08d}.JPEG")
    with pytest.raises(DataError, match=rf"{val} holds 12 images directly in it, beside 8 sorted into class folders "
                                        r"\(ILSVRC2012_val_00000008.JPEG, .*\).*valprep.sh"):
        read(val, ["n00", "n01"])
    for path in sorted(val.glob("*.JPEG")):
        path.unlink()
    for i in range(8, 1000):  # a sorted split of 1000: one stray picture is left out with a warning
        (val / "n00" / f"{i}.JPEG").hardlink_to(val / "n00" / "ILSVRC2012_val_00000000.JPEG")
    _image(val / "preview.png")
    assert len(read(val, ["n00", "n01"])) == 1000
    assert "1 images lie beside the class folders, in no class, and are left out: preview.png" in caplog.text


@pytest.mark.parametrize("reader", ["pretrain", "folder_cls", "video"])
def test_a_flat_split_says_how_to_sort_it(tmp_path, reader):
    from rs_transfer.downstream.folder_cls import list_split
    from rs_transfer.pretrain.data import find_classes
    from rs_transfer.video.data import _folder_rows

    val = tmp_path / "val"
    suffix = ".mp4" if reader == "video" else ".JPEG"
    for i in range(3):
        (val / f"ILSVRC2012_val_{i:08d}{suffix}").parent.mkdir(parents=True, exist_ok=True)
        (val / f"ILSVRC2012_val_{i:08d}{suffix}").write_bytes(b"x")
    read = {"pretrain": find_classes, "folder_cls": lambda folder: list_split(folder, ["a"]),
            "video": lambda folder: _folder_rows(tmp_path, "val")}[reader]
    with pytest.raises(DataError, match=rf"{val} holds 3 (images|videos) directly in it, and no class folder .*move "
                                        r"them into their class folders"):
        read(val)


def test_nyu_bts_pairs_missing_from_sync_are_found_at_start_up(tmp_path, caplog):
    # a sync/ copy short of some files: found when the dataset is built, not when an epoch reaches them
    root = nyu_depth.write_nyu_bts(tmp_path, train=6, val=3)
    (root / "sync" / "kitchen_0001" / "sync_depth_00003.png").unlink()
    train = nyu_depth.NYUDepth(root, "train", "bts")
    assert len(train) == 5
    assert "1 of the 6 listed pairs have a file missing and are left out (first: line 4" in caplog.text
    (root / "official_splits" / "test" / "kitchen_0000" / "rgb_00002.jpg").unlink()
    with pytest.raises(DataError, match=r"nyudepthv2_test_files_with_gt.txt line 3: .*rgb_00002.jpg is missing \(1 of "
                                        r"the 3 listed pairs .*every test pair counts"):
        nyu_depth.NYUDepth(root, "val", "bts")


def test_a_cifar_pickle_whose_data_is_a_self_referencing_list_is_refused_before_numpy_builds_it(tmp_path):
    # 34 levels of [L, L] through the pickle memo: a few hundred bytes that np.asarray would expand to 2^34 items
    nested = []
    level = nested
    for _ in range(34):
        level = [level, level]
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    (folder / "train").write_bytes(pickle.dumps({b"data": level, b"fine_labels": [0]}, protocol=2))
    assert (folder / "train").stat().st_size < 1000
    with pytest.raises(DataError, match=r"is not a CIFAR-100 pickle .*'data' is a list, not an array"):
        cifar100.read_cifar(tmp_path, "train")
