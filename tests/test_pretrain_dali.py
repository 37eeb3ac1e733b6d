"""The optional DALI training batches (rs_transfer.pretrain.dali) on DALI's CPU-only pipeline: batch contents and
order, per-sample determinism (what exact resume needs), the TF RandAugment ops against transforms.py, errors."""

import io
import pickle
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from engine_toy import CONFIGS
from rs_transfer.bench.data import synthetic_jpegs
from rs_transfer.errors import UserError
from rs_transfer.pretrain import dali, data, transforms
from rs_transfer.pretrain.synthetic import make_image

SIZE = 48
JPEGS = synthetic_jpegs(12, size=(120, 90))
LABELS = [100 + 7 * i for i in range(len(JPEGS))]  # distinct, and unlike the index, so the order is checked
STORE = {i: (jpeg, label) for i, (jpeg, label) in enumerate(zip(JPEGS, LABELS))}
READ = STORE.__getitem__  # a bound method of a dict: pickles, as DALI's spawned workers need
KEYS = [(0, 5), (0, 2), (0, 11), (0, 0), (1, 5), (1, 7), (1, 3), (1, 9), (1, 1), (1, 5)]


def batches(keys=KEYS, batch_size=4, **options) -> list:
    return list(dali.DaliBatches(READ, keys, batch_size, SIZE, **options))


def images(result: list) -> torch.Tensor:
    return torch.cat([batch["image"] for batch in result])


def test_batches_are_uint8_chw_with_the_labels_of_the_keys_in_order_and_a_short_last_batch():
    result = batches()
    # 10 keys in batches of 4: the last batch holds the 2 keys left over (nothing dropped, nothing repeated).
    assert [len(batch["label"]) for batch in result] == [4, 4, 2] and len(dali.DaliBatches(READ, KEYS, 4, SIZE)) == 3
    for batch in result:
        assert batch["image"].dtype == torch.uint8 and batch["image"].shape[1:] == (3, SIZE, SIZE)
        assert batch["label"].dtype == torch.int64 and batch["image"].device == batch["label"].device
        # NHWC in memory, as DALI makes it: the engine's channels-last input without a transpose or a copy
        assert batch["image"].is_contiguous(memory_format=torch.channels_last)
    assert torch.cat([batch["label"] for batch in result]).tolist() == [LABELS[index] for _, index in KEYS]
    pixels = images(result)
    assert pixels.float().std() > 10  # images, not a constant fill
    assert not torch.equal(pixels[0], pixels[4])  # keys (0, 5) and (1, 5): another epoch, another augmentation
    assert torch.equal(pixels[4], pixels[9])  # key (1, 5) twice: the same sample


def test_a_sample_depends_on_its_key_and_the_seed_only_so_resuming_with_the_remaining_keys_is_exact():
    full = images(batches(seed=3))
    assert torch.equal(full, images(batches(seed=3)))
    # Other batch boundaries, threads and a resumed run (the keys after the 6th) give the same samples.
    assert torch.equal(full, images(batches(batch_size=3, seed=3, num_threads=2)))
    assert torch.equal(full[6:], images(batches(keys=KEYS[6:], seed=3)))
    assert not torch.equal(full, images(batches(seed=4)))


def test_parallel_workers_give_the_same_batches():
    parallel = batches(py_workers=2, py_start_method="fork", seed=3)
    assert torch.equal(images(parallel), images(batches(seed=3)))
    assert torch.cat([batch["label"] for batch in parallel]).tolist() == [LABELS[index] for _, index in KEYS]
    # A trainer that has initialised CUDA must "spawn" its workers, which receive the source pickled. (Not run
    # here: DALI 2.4's pool leaves its socket to each spawned worker open, a ResourceWarning the suite would fail.)
    source = dali.KeySource(READ, KEYS, 4, SIZE, (0.08, 1.0), 2, 10.0, seed=3)
    second_batch = SimpleNamespace(iteration=1)
    first, again = source(second_batch), pickle.loads(pickle.dumps(source))(second_batch)
    assert [column.tolist() for column in first[1]] == [LABELS[index] for _, index in KEYS[4:8]]
    assert all(np.array_equal(a, b) for column, other in zip(first, again) for a, b in zip(column, other))


def pil_crop_and_flip(encoded: bytes, seed: int, epoch: int, index: int, scale: tuple) -> torch.Tensor:
    """The PyTorch path's crop (bicubic) and flip of key (epoch, index), with the DALI path's parameters: int CHW."""
    image = data.decode(encoded)
    params = dali.sample_params(seed, epoch, index, *image.size, SIZE, scale, 0, 10.0)
    (x, y), (w, h) = params["crop_anchor"].tolist(), params["crop_shape"].tolist()
    # The functional ops that transforms.train_transform's v2.RandomResizedCrop and v2.RandomHorizontalFlip apply.
    image = F.resized_crop(image, y, x, h, w, [SIZE, SIZE], interpolation=InterpolationMode.BICUBIC)
    if params["flip"]:
        image = F.horizontal_flip(image)
    return F.pil_to_tensor(image).int()


def test_crop_flip_and_resize_match_the_pil_transform_with_the_same_parameters():
    keys = [(0, i) for i in range(6)]
    result = images(batches(keys=keys, batch_size=6, num_layers=0, seed=1))
    for got, (epoch, index) in zip(result, keys):
        difference = (got.int() - pil_crop_and_flip(JPEGS[index], 1, epoch, index, (0.08, 1.0))).abs()
        # libjpeg-turbo in both; DALI's antialiased cubic resize rounds a little differently from PIL's.
        assert difference.max() <= 3 and difference.float().mean() < 0.5


def test_crop_window_follows_random_resized_crop():
    draws = dali.uniforms(0, np.zeros(500), np.arange(500), 2 * dali.CROP_TRIES + 2)
    x, y, w, h = dali.crop_windows(draws, np.full(500, 400), np.full(500, 300), (0.25, 1.0)).T
    assert (x >= 0).all() and (y >= 0).all() and (x + w <= 400).all() and (y + h <= 300).all()
    assert (w * h >= 0.24 * 400 * 300).all() and (w / h > 0.74).all() and (w / h < 1.34).all()
    assert len(set(zip(x, y, w, h))) > 490  # the samples' draws are independent
    # A strip no crop of ratio 3/4-4/3 and area >= 25% fits: torchvision's fallback, the centred largest one.
    assert dali.crop_windows(draws[:1], [1000], [10], (0.25, 1.0)).tolist() == [[493, 0, 13, 10]]
    # Each sample's draws depend on (seed, epoch, index) only: not on the batch it is computed in.
    assert np.array_equal(dali.uniforms(0, np.zeros(3), np.arange(7, 10), 4)[1], dali.uniforms(0, [0], [8], 4)[0])
    assert not np.array_equal(draws[:2], dali.uniforms(1, np.zeros(2), np.arange(2), 2 * dali.CROP_TRIES + 2))


class ForcedChoice:
    """The random draws of transforms.TF_OPS fixed: magnitudes not negated, cutout centred at (10, 10)."""

    def random(self):
        return 0.9

    def randrange(self, stop):
        return 10

    def integers(self, stop):
        return 10


# Largest |DALI - PIL| difference allowed per op (uint8 levels). Equalize: DALI's follows OpenCV's formula, PIL's
# another (docs/pretrain.md); its bound is on the mean difference.
EXACT = ("Invert", "Posterize", "Solarize", "SolarizeAdd", "ShearX", "ShearY", "TranslateX", "TranslateY", "Cutout")
ROUNDING = ("AutoContrast", "Color", "Contrast", "Brightness", "Sharpness")


@pytest.mark.parametrize("magnitude", [7.0, 15.0])
def test_tf_randaugment_ops_match_transforms_py(magnitude):
    from nvidia.dali import fn, pipeline_def
    from nvidia.dali.auto_aug.core import select

    image = np.asarray(make_image(3, 10, (SIZE, SIZE), np.random.default_rng(0)).convert("RGB"))
    count = len(dali.OPS)
    matrices = list(dali.affine_matrices(np.arange(count), np.ones(count), magnitude, SIZE))
    box = dali.cutout_boxes(np.full(2, 10.5 / SIZE), magnitude, SIZE)  # centred at (10, 10), as ForcedChoice

    @pipeline_def(batch_size=count, num_threads=1, device_id=None, enable_conditionals=True)
    def each_op_once():
        batch = fn.external_source(lambda: [image] * count, batch=True, layout="HWC")
        op = fn.external_source(lambda: [np.array(i, dtype=np.int32) for i in range(count)], batch=True)
        matrix = fn.external_source(lambda: matrices, batch=True)
        boxes = fn.external_source(lambda: [box] * count, batch=True)
        return select(dali.tf_randaugment_ops(magnitude, SIZE), op, batch, matrix=matrix, box=boxes)

    pipeline = each_op_once()
    pipeline.build()
    (outputs,) = pipeline.run()
    for i, name in enumerate(dali.OPS):
        expected = np.asarray(transforms.TF_OPS[name](Image.fromarray(image), magnitude, ForcedChoice()))
        difference = np.abs(np.asarray(outputs[i]).astype(int) - expected.astype(int))
        if name in EXACT:
            assert difference.max() == 0, name
        elif name in ROUNDING:
            assert difference.max() <= 2 and difference.mean() < 0.6, name
        elif name == "Rotate":  # nearest-neighbour sampling on a pixel boundary, once in a while
            assert (difference > 0).mean() < 0.002, name
        else:
            assert name == "Equalize" and difference.mean() < 16, name


def test_an_unreadable_image_is_named_by_its_key():
    store = dict(STORE)
    store[3] = (b"not an image", 0)
    with pytest.raises(UserError, match=r"sample \(0, 3\) \(epoch, index\): unknown image format"):
        list(dali.DaliBatches(store.__getitem__, [(0, 1), (0, 3)], 2, SIZE))
    # A header that parses but a stream DALI cannot decode: named after DALI's failure, in the batch it belongs to.
    store[3] = (JPEGS[3][:len(JPEGS[3]) // 3], 0)
    seen = []
    with pytest.raises(UserError, match=r"cannot decode sample \(1, 3\) \(epoch, index\) of batch 1"):
        for batch in dali.DaliBatches(store.__getitem__, [(0, 1), (0, 2), (0, 4), (1, 3)], 2, SIZE):
            seen.append(batch["label"].tolist())
    assert seen == [[LABELS[1], LABELS[2]]]


def test_without_dali_the_error_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # `import nvidia.dali` now raises ImportError
    with pytest.raises(UserError, match=r"needs NVIDIA DALI, which is not installed .*pip install -e '\.\[dali\]'"):
        dali.DaliBatches(READ, KEYS, 4, SIZE)


def test_encoded_formats_other_than_jpeg_decode_like_pil():
    rng = np.random.default_rng(0)
    base = Image.fromarray((rng.random((60, 80, 3)) * 255).astype(np.uint8))
    sixteen_bit = Image.fromarray((rng.random((60, 80)) * 65535).astype(np.uint16))
    encoded = []
    for image, fmt in [(base.convert("L"), "JPEG"), (base.convert("CMYK"), "JPEG"), (base.convert("RGBA"), "PNG"),
                       (base.convert("P"), "PNG"), (sixteen_bit, "PNG"), (base, "WEBP"), (base, "BMP")]:
        buffer = io.BytesIO()
        image.save(buffer, format=fmt)
        encoded.append(buffer.getvalue())
    store = {i: (payload, i) for i, payload in enumerate(encoded)}
    keys = [(0, i) for i in range(len(encoded))]
    result = images(list(dali.DaliBatches(store.__getitem__, keys, 8, SIZE, crop_min_area=1.0, num_layers=0)))
    assert len(result) == len(encoded)
    for got, (epoch, index) in zip(result, keys):
        expected = pil_crop_and_flip(encoded[index], 0, epoch, index, (1.0, 1.0))
        assert (got.int() - expected).abs().float().mean() < 1.0, index


def test_data_backend_dali_trains_through_the_engine_and_resumes_bitwise(tmp_path):
    # The engine's keys reach DALI through RunSampler as a sequence: 4 steps in one go and 2 + 2 with --resume give
    # the same weights only if the resumed loader starts at the right key with the same per-key augmentation.
    from rs_transfer.cli import main
    from rs_transfer.pretrain.synthetic import make_folder_dataset

    root = make_folder_dataset(tmp_path / "data", num_classes=3, train_per_class=6, val_per_class=2)
    demo = CONFIGS / "pretrain" / "demo.yaml"
    # data.num_workers=1: one feeder process (DALI's parallel external source, forked on the CPU) reads ahead
    common = ["pretrain", "--config", str(demo), f"data.root={root}", "data.backend=dali", "data.num_workers=1",
              "model.name=rs26-w0.25", "data.image_size=32", "train.batch_size=4", "train.epochs=null",
              "train.log_every_steps=1", "train.checkpoint_every_steps=1", "train.eval_every_epochs=0"]
    assert main([*common, "train.steps=4", f"output_dir={tmp_path / 'whole'}"]) == 0
    assert main([*common, "train.steps=2", f"output_dir={tmp_path / 'split'}"]) == 0
    half = torch.load(tmp_path / "split" / "final.pt", weights_only=True)
    assert main([*common, "train.steps=4", f"output_dir={tmp_path / 'split'}", "--resume"]) == 0
    whole = torch.load(tmp_path / "whole" / "final.pt", weights_only=True)
    split = torch.load(tmp_path / "split" / "final.pt", weights_only=True)
    assert all(torch.equal(value, split["model"][key]) for key, value in whole["model"].items())
    assert not all(torch.equal(value, half["model"][key]) for key, value in whole["model"].items())


def test_data_backend_dali_refuses_what_it_does_not_do(tmp_path, capsys):
    from rs_transfer.cli import main

    demo = CONFIGS / "pretrain" / "demo.yaml"
    from rs_transfer.pretrain.synthetic import make_folder_dataset

    root = make_folder_dataset(tmp_path / "data", num_classes=2, train_per_class=2, val_per_class=1)
    base = ["pretrain", "--config", str(demo), f"data.root={root}", "data.backend=dali", f"output_dir={tmp_path}/o"]
    assert main([*base, "augment.randaugment=timm"]) == 2
    assert "implements the TF RandAugment only" in capsys.readouterr().err
    assert main([*base, "cotrain.enabled=true", f"cotrain.pseudo_labels={tmp_path}"]) == 2
    assert "does not do co-training" in capsys.readouterr().err
    assert main([*base, "data.backend=nvdec"]) == 2
    assert "data.backend" in capsys.readouterr().err
