import json
import logging
import random

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from engine_toy import CONFIGS
from rs_transfer.errors import UserError
from rs_transfer.pretrain import data, transforms
from rs_transfer.pretrain.synthetic import make_folder_dataset, make_image, make_shard_dataset, write_shards


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder_dataset(tmp_path_factory.mktemp("folder"), num_classes=3, train_per_class=10, val_per_class=3)


def test_folder_layout_loads_png_and_jpeg_of_odd_sizes(folder):
    items, classes = data.load_split(folder, "train", num_classes=3)
    assert classes == ["class_000", "class_001", "class_002"]
    assert len(items) == 30
    assert {item.ref.rsplit(".", 1)[1] for item in items} == {"jpg", "png"}
    assert [item.label for item in items] == sorted(item.label for item in items)
    val, val_classes = data.load_split(folder, "val", num_classes=3, classes=classes)
    assert len(val) == 9 and val_classes == classes
    dataset = data.ImageDataset(items, transforms.train_transform(32, "tf", 2, 10))
    batch = next(iter(DataLoader(dataset, batch_size=8, shuffle=True, num_workers=2, collate_fn=data.collate)))
    assert batch["image"].shape == (8, 3, 32, 32) and batch["image"].dtype == torch.uint8  # normalised on the device
    assert batch["label"].dtype == torch.long and set(batch["label"].tolist()) <= {0, 1, 2}


def test_folder_class_count_mismatch_names_the_folder(folder):
    with pytest.raises(UserError, match=r"3 class folders but model.num_classes=1000"):
        data.load_split(folder, "train", num_classes=1000)
    with pytest.raises(UserError, match="data split not found"):
        data.load_split(folder, "test", num_classes=3)


def test_tar_shards_load_with_labels(tmp_path):
    root = make_shard_dataset(tmp_path, num_classes=3, train_per_class=6, val_per_class=2, per_shard=5)
    assert len(list((root / "train").glob("*.tar"))) == 4
    items, classes = data.load_split(root, "train", num_classes=3)
    assert classes is None and len(items) == 18
    assert sorted(item.label for item in items) == [0] * 6 + [1] * 6 + [2] * 6
    image, label = data.ImageDataset(items, transforms.eval_transform(24))[7]
    assert image.shape == (3, 24, 24) and label == items[7].label
    with pytest.raises(UserError, match="outside model.num_classes=2"):
        data.load_split(root, "train", num_classes=2)


def test_shards_read_the_same_pixels_as_the_encoded_file(tmp_path):
    rng = np.random.default_rng(0)
    images = [make_image(i % 2, 2, (33, 21), rng) for i in range(3)]
    write_shards(tmp_path, [(f"a/k{i}", image, i % 2) for i, image in enumerate(images)])
    items = data.scan_shards(sorted(tmp_path.glob("*.tar")))
    assert [item.ref for item in items] == ["shard-00000.tar/a/k0", "shard-00000.tar/a/k1", "shard-00000.tar/a/k2"]
    decoded = data.decode(data.read_bytes(items[1].where))
    assert decoded.size == (33, 21)
    assert np.abs(np.asarray(decoded, dtype=float) - np.asarray(images[1], dtype=float)).mean() < 8  # JPEG loss


def test_minival_split_is_deterministic_disjoint_and_two_percent(tmp_path):
    items = [data.Item(f"c{i % 7}/img_{i:05d}.jpg", i % 7, "") for i in range(1000)]
    train, minival = data.minival_split(items, 0.02, seed=0)
    assert len(minival) == 20 and len(train) == 980
    assert not {i.ref for i in train} & {i.ref for i in minival}
    assert {i.ref for i in train} | {i.ref for i in minival} == {i.ref for i in items}
    shuffled = items[:]
    random.Random(1).shuffle(shuffled)
    refs = {i.ref for i in minival}
    assert {i.ref for i in data.minival_split(shuffled, 0.02, seed=0)[1]} == refs  # listing order does not matter
    assert data.minival_split(items, 0.02, seed=0)[1] == minival
    assert {i.ref for i in data.minival_split(items, 0.02, seed=1)[1]} != refs


def test_corrupt_image_is_skipped_named_and_counted(folder, tmp_path, caplog):
    items, _ = data.load_split(folder, "train", num_classes=3)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(data.read_bytes(items[0].where)[:200])  # a truncated JPEG
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image at all")
    items = [data.Item("broken.jpg", 0, str(broken)), data.Item("garbage.png", 1, str(garbage))] + items[2:]
    dataset = data.ImageDataset(items, transforms.eval_transform(16))
    with caplog.at_level(logging.WARNING, logger="rs_transfer.pretrain.data"):
        loaded = [dataset[i] for i in range(len(dataset))]
    assert len(loaded) == len(items)
    assert loaded[0][1] == items[2].label  # the next readable image stands in
    messages = [r.getMessage() for r in caplog.records]
    assert sum("broken.jpg" in m for m in messages) == 1 and sum("garbage.png" in m for m in messages) == 2
    assert all("unknown image format" in m for m in messages if "garbage.png" in m)
    assert dataset.skipped == 3  # index 0 tries both broken files, index 1 tries garbage.png
    loader = DataLoader(dataset, batch_size=4, num_workers=2, collate_fn=data.collate)
    assert sum(len(b["label"]) for b in loader) == len(items)
    assert dataset.skipped == 6  # skips inside worker processes are counted too


def test_train_transform_shapes_and_ranges():
    random.seed(0)
    torch.manual_seed(0)
    image = make_image(1, 4, (97, 61), np.random.default_rng(0))
    for kind in ("tf", "timm", "none"):
        out = transforms.train_transform(48, kind, 2, 15)(image)
        assert out.shape == (3, 48, 48) and out.dtype == torch.uint8  # the model normalises on the device
        assert out.min() >= 0 and out.max() <= 255
    with pytest.raises(UserError, match="augment.randaugment"):
        transforms.train_transform(48, "autoaugment", 2, 10)


@pytest.mark.parametrize("timm_config", ["garbage", "rand-m9-x3", "rand-m9.5"])
def test_a_timm_config_timm_refuses_is_a_config_error_naming_the_key(timm_config):
    from rs_transfer.config import ConfigError

    with pytest.raises(ConfigError, match=rf"^augment\.timm_config='{timm_config}' is not a timm RandAugment string"):
        transforms.train_transform(48, "timm", 2, 10, timm_config=timm_config)


def test_pretrain_with_a_bad_timm_config_exits_2_with_one_error_line(folder, tmp_path, capsys):
    from rs_transfer.cli import main

    code = main(["pretrain", "--config", str(DEMO), f"data.root={folder}", f"output_dir={tmp_path}",
                 "data.num_workers=0", "augment.randaugment=timm", "augment.timm_config=garbage"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1] == ("error: augment.timm_config='garbage' is not a timm RandAugment string: expected e.g. "
                       "'rand-m9-n2-mstd0.5-inc1'")


def test_eval_crop_is_the_tf_fraction_of_the_short_side():
    # 224 / (224 + 32) = 0.875 of the short side, centred, then resized to 224.
    crop = transforms.CenterCropFraction(224)
    assert crop.fraction == pytest.approx(0.875)
    assert transforms.CenterCropFraction(160).fraction == pytest.approx(160 / 183)
    image = Image.new("RGB", (400, 256), (0, 0, 0))
    image.paste((255, 255, 255), (88, 16, 312, 240))  # exactly the 224 x 224 centre square
    out = np.asarray(crop(image))
    assert out.shape == (224, 224, 3) and out[2:-2, 2:-2].min() == 255
    tensor = transforms.eval_transform(64)(image)
    assert tensor.shape == (3, 64, 64)


def test_tf_randaugment_applies_exactly_n_ops_from_the_sixteen():
    assert len(transforms.TF_OPS) == 16
    calls = []

    def counting(name, op):
        def wrapped(image, level, rng):
            calls.append((name, level))
            return op(image, level, rng)
        return wrapped

    ops = {name: counting(name, op) for name, op in transforms.TF_OPS.items()}
    augment = transforms.TFRandAugment(num_layers=2, magnitude=15, ops=ops)
    image = make_image(0, 4, (64, 48), np.random.default_rng(0))
    random.seed(0)
    for _ in range(200):
        before = len(calls)
        out = augment(image)
        assert len(calls) - before == 2 and out.size == image.size and out.mode == "RGB"
    assert {name for name, _ in calls} == set(transforms.TF_OPS)  # every op is reachable
    assert {level for _, level in calls} == {15.0}  # magnitude past 10 is kept, not clamped


def test_tf_ops_follow_the_tf_magnitude_rules():
    image = Image.new("RGB", (200, 200), (200, 10, 10))
    rng = random.Random(0)
    shifted = np.asarray(transforms.TF_OPS["TranslateX"](image, 15, rng))
    # 150 px at M=15: only 50 columns keep the image, the rest is grey 128.
    grey_columns = (shifted == 128).all(axis=(0, 2)).sum()
    assert grey_columns == 150
    assert np.array_equal(np.asarray(transforms.TF_OPS["Solarize"](image, 15, rng)), np.asarray(image))
    assert np.asarray(transforms.TF_OPS["Solarize"](image, 5, rng))[0, 0].tolist() == [55, 10, 10]
    cut = np.asarray(transforms.TF_OPS["Cutout"](image, 10, rng))
    assert 0 < (cut == 128).all(axis=2).sum() <= 80 * 80


DEMO = CONFIGS / "pretrain" / "demo.yaml"


def test_num_classes_unset_is_inferred_from_the_class_folders(folder):
    items, classes = data.load_split(folder, "train", num_classes=None)
    assert len(items) == 30 and data.infer_num_classes(items, classes, folder / "train") == 3


def test_num_classes_unset_for_shards_is_max_label_plus_one_only_when_no_class_is_missing(tmp_path):
    root = make_shard_dataset(tmp_path / "full", num_classes=3, train_per_class=2, val_per_class=1)
    items, classes = data.load_split(root, "train", num_classes=None)
    assert data.infer_num_classes(items, classes, root / "train") == 3
    rng = np.random.default_rng(0)
    samples = [(f"k{i}", make_image(i % 3, 3, (16, 16), rng), i % 3 + 1) for i in range(6)]  # 1-based labels
    write_shards(tmp_path / "gap" / "train", samples)
    items, classes = data.load_split(tmp_path / "gap", "train", num_classes=None)
    with pytest.raises(UserError, match=r"gap/train: tar shards have labels 1\.\.3 but no image of class 0; "
                                        r"set model.num_classes"):
        data.infer_num_classes(items, classes, tmp_path / "gap" / "train")
    assert len(data.load_split(tmp_path / "gap", "train", num_classes=4)[0]) == 6  # set: the range check only


def test_class_folder_without_images_and_files_not_used_are_named(tmp_path, caplog):
    root = make_folder_dataset(tmp_path, num_classes=2, train_per_class=2, val_per_class=1)
    (root / "train" / "class_002").mkdir()
    (root / "train" / "class_002" / "scan.tif").write_bytes(b"II*\x00")  # not an extension we read
    (root / "train" / "class_000" / "notes.txt").write_text("about this class")
    (root / "train" / "class_000" / ".DS_Store").write_bytes(b"\x00")  # hidden: not data, not reported
    with caplog.at_level(logging.WARNING, logger="rs_transfer.pretrain.data"):
        items, classes = data.load_split(root, "train", num_classes=None)
    assert classes == ["class_000", "class_001", "class_002"] and len(items) == 4
    assert data.infer_num_classes(items, classes, root / "train") == 3
    messages = [r.getMessage() for r in caplog.records]
    assert any("1 class folder(s) hold no image" in m and "class_002" in m and "class_000" not in m for m in messages)
    assert any("2 files in class folders are not used" in m and "class_000/notes.txt" in m and "class_002/scan.tif" in m
               and ".DS_Store" not in m for m in messages)


def test_demo_config_leaves_num_classes_to_the_data():
    from rs_transfer.config import load_config
    from rs_transfer.pretrain.config import PretrainConfig

    assert load_config(PretrainConfig, DEMO, []).model.num_classes is None


def test_task_resolves_num_classes_for_the_model_and_cotraining(tmp_path):
    from rs_transfer.config import load_config
    from rs_transfer.pretrain.config import PretrainConfig
    from rs_transfer.pretrain.pseudo_label import FORMAT, write_table
    from rs_transfer.pretrain.task import build_task

    root = make_folder_dataset(tmp_path / "data", num_classes=3, train_per_class=2, val_per_class=1)
    pseudo = tmp_path / "pseudo"
    n = len(data.list_images(root / "val"))  # a pseudo-label folder in the real format: every image class 2
    write_table(pseudo / "labels", np.arange(n), np.full(n, 2), np.full(n, 0.9), np.tile([2, 0], (n, 1)),
                np.tile([0.9, 0.1], (n, 1)))
    np.save(pseudo / "selected.npy", np.arange(n))
    (pseudo / "meta.json").write_text(json.dumps({"format": FORMAT, "images": str(root / "val"), "samples": n,
                                                  "num_classes": 3}))
    config = load_config(PretrainConfig, DEMO, [f"data.root={root}", "data.num_workers=0", "cotrain.enabled=true",
                                                f"cotrain.pseudo_labels={pseudo}", "data.image_size=16"])
    task = build_task(config)
    assert config.model.num_classes == 3 and task.model.net.fc.out_features == 3
    batch = task.collate_fn([0, 1, 2, 3])
    assert batch["target"].shape == (4, 3) and batch["num_pseudo"] == 2
    assert batch["target"][2:].argmax(1).tolist() == [2, 2]
    assert batch["target"][2:, 2].tolist() == pytest.approx([0.9, 0.9]) and batch["target"][2:, 1].tolist() == [0, 0]


def test_uint8_images_are_normalised_on_the_device_as_the_loader_did_before():
    # The loader used to ship (x / 255 - mean) / std in float32; the model's Normalize now does exactly that.
    from rs_transfer.models.normalize import IMAGENET_MEAN, IMAGENET_STD, Normalize
    from rs_transfer.engine.classification import Classifier

    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    expected = (images.float() / 255 - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    torch.testing.assert_close(Normalize()(images), expected)
    channels_last = Normalize()(images.contiguous(memory_format=torch.channels_last))
    assert channels_last.is_contiguous(memory_format=torch.channels_last)
    net = torch.nn.Identity()
    torch.testing.assert_close(Classifier(net).eval()({"image": images}), expected)
