"""Images that are not 8-bit RGB, through `rs_transfer.data.images` and through every reader that decodes RGB:
pretraining folders and shards, the pseudo-label dataset, downstream `read_image` (VOC, ADE, VOC detection) and
NYU's BTS layout. Label and depth PNGs keep their raw values."""

import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image, ImageCms

from rs_transfer.data.images import decode_rgb8, read_rgb8, to_rgb8
from rs_transfer.downstream import nyu_depth, pascal_seg, segmentation
from rs_transfer.downstream.data import read_image, read_label_png
from rs_transfer.errors import DataError
from rs_transfer.pretrain import data, transforms
from rs_transfer.pretrain.pseudo_label import _Images

RAMP_MEAN = 127.5  # a 0..65535 ramp scaled to 0..255


def ramp16(height: int = 64, width: int = 64) -> Image.Image:
    """A 16-bit greyscale image (mode I;16) whose values run evenly from 0 to 65535 in reading order."""
    return Image.fromarray(np.linspace(0, 65535, height * width).round().astype(np.uint16).reshape(height, width))


def png_bytes(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **options)
    return buffer.getvalue()


def pixel(image: Image.Image) -> tuple:
    out = to_rgb8(image)
    assert out.mode == "RGB" and out.size == image.size
    return out.getpixel((0, 0))


def palette_image(mode: str, index: int = 1) -> Image.Image:
    image = Image.new(mode, (2, 2), index if mode == "P" else (index, 200))
    image.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    return image


@pytest.mark.parametrize("mode, value, expected", [
    ("1", 1, (255, 255, 255)),
    ("L", 100, (100, 100, 100)),
    ("LA", (100, 0), (100, 100, 100)),  # alpha dropped, not blended
    ("La", (50, 100), (127, 127, 127)),  # premultiplied: 50 / (100 / 255)
    ("RGBA", (10, 20, 30, 0), (10, 20, 30)),
    ("RGBa", (50, 50, 50, 100), (127, 127, 127)),
    ("RGBX", (10, 20, 30, 0), (10, 20, 30)),
    ("CMYK", (0, 255, 0, 0), (255, 0, 255)),
    ("YCbCr", (128, 128, 128), (128, 128, 128)),
    ("HSV", (0, 255, 255), (255, 0, 0)),
    ("I;16", 128 * 257, (128, 128, 128)),
    ("I;16B", 65535, (255, 255, 255)),
    ("I;16L", 100 * 257, (100, 100, 100)),
    ("I;16N", 0, (0, 0, 0)),
    ("I", 100 * 257, (100, 100, 100)),  # 16-bit data, as a 16-bit PNG opens in some Pillow versions
    ("I", 70000, (255, 255, 255)),  # above 16 bits: clipped
    ("I", -5, (0, 0, 0)),
    ("F", 0.5, (128, 128, 128)),  # largest value <= 1: [0, 1]
    ("F", 1.0, (255, 255, 255)),
    ("F", 2.0, (2, 2, 2)),  # otherwise 0..255
    ("F", 300.0, (255, 255, 255)),  # clipped
    ("F", float("nan"), (0, 0, 0)),
])
def test_every_mode_becomes_8_bit_rgb_with_the_right_values(mode, value, expected):
    assert pixel(Image.new(mode, (2, 2), value)) == expected


def test_palette_images_with_and_without_transparency_keep_their_colours_without_a_warning():
    assert pixel(palette_image("P")) == (10, 20, 30)
    assert pixel(palette_image("PA")) == (10, 20, 30)
    # A PNG palette with a tRNS byte table: PIL's convert("RGB") warns (an error under this suite's settings).
    transparent = Image.open(io.BytesIO(png_bytes(palette_image("P"), transparency=bytes([0, 128]))))
    assert transparent.mode == "P" and isinstance(transparent.info["transparency"], bytes)
    assert pixel(transparent) == (10, 20, 30)


def test_lab_is_converted_as_colour_not_copied_as_bytes():
    grey = pixel(Image.new("LAB", (2, 2), (128, 128, 128)))  # L* = 50, a* = b* = 0: sRGB grey about 119
    assert grey[0] == grey[1] == grey[2] and 116 <= grey[0] <= 122
    to_lab = ImageCms.buildTransform(ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"), "RGB", "LAB")
    red = ImageCms.applyTransform(Image.new("RGB", (2, 2), (200, 30, 30)), to_lab)
    assert np.abs(np.subtract(pixel(red), (200, 30, 30))).max() <= 8


def test_16_bit_and_float_ramps_decode_to_a_mid_grey_mean(tmp_path):
    assert np.asarray(decode_rgb8(png_bytes(ramp16()))).mean() == pytest.approx(RAMP_MEAN, abs=1)
    ramp = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    Image.fromarray(ramp).save(tmp_path / "float.tif")
    assert np.asarray(read_rgb8(tmp_path / "float.tif")).mean() == pytest.approx(RAMP_MEAN, abs=1)
    as_int = Image.fromarray(np.asarray(ramp16()).astype(np.int32))
    assert as_int.mode == "I" and np.asarray(to_rgb8(as_int)).mean() == pytest.approx(RAMP_MEAN, abs=1)


@pytest.mark.parametrize("top", [1.0, 255.0])
def test_float_tiffs_in_0_1_and_in_0_255_both_decode_to_a_mid_grey_mean(tmp_path, top):
    ramp = np.linspace(0, top, 64 * 64, dtype=np.float32).reshape(64, 64)
    Image.fromarray(ramp).save(tmp_path / "float.tif")
    decoded = np.asarray(read_rgb8(tmp_path / "float.tif"))
    assert decoded.mean() == pytest.approx(RAMP_MEAN, abs=1)
    assert decoded.min() == 0 and decoded.max() == 255


def test_float_image_beyond_0_255_is_clipped_and_nan_is_ignored_for_its_range():
    values = np.array([[-10.0, 0.5], [float("nan"), 400.0]], dtype=np.float32)  # largest 400: a 0..255 image
    assert np.asarray(to_rgb8(Image.fromarray(values)))[..., 0].tolist() == [[0, 0], [0, 255]]
    unit = np.array([[0.0, 0.5], [float("nan"), 1.0]], dtype=np.float32)  # NaN does not make it a 0..255 image
    assert np.asarray(to_rgb8(Image.fromarray(unit)))[..., 0].tolist() == [[0, 128], [0, 255]]


def test_pretrain_folder_shard_and_pseudo_label_readers_scale_16_bit_pngs(tmp_path):
    (tmp_path / "train" / "grey").mkdir(parents=True)
    (tmp_path / "train" / "grey" / "ramp.png").write_bytes(png_bytes(ramp16()))
    items, _ = data.load_split(tmp_path, "train", 1)
    image, _ = data.ImageDataset(items)[0]
    assert np.asarray(image).mean() == pytest.approx(RAMP_MEAN, abs=1)

    shard = tmp_path / "shards" / "shard-00000.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as tar:
        for name, payload in (("ramp.png", png_bytes(ramp16())), ("ramp.cls", b"0")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    shard_items = data.scan_shards([shard])
    image, label = data.ImageDataset(shard_items)[0]
    assert label == 0 and np.asarray(image).mean() == pytest.approx(RAMP_MEAN, abs=1)

    # Pseudo-labelling crops and resizes, so it gets a uniform image: 16-bit 128 * 257 must stay 128.
    (tmp_path / "unlabelled").mkdir()
    (tmp_path / "unlabelled" / "mid.png").write_bytes(png_bytes(Image.new("I;16", (40, 40), 128 * 257)))
    tensor, error = _Images(data.list_images(tmp_path / "unlabelled"), transforms.eval_transform(32))[0]
    assert error == "" and tensor.dtype == torch.uint8 and float((tensor.float() - 128).abs().max()) < 0.5


def test_downstream_read_image_and_datasets_scale_16_bit_images(tmp_path):
    (tmp_path / "ramp.png").write_bytes(png_bytes(ramp16()))
    image = read_image(tmp_path / "ramp.png")
    assert image.dtype == torch.uint8 and image.shape == (3, 64, 64)
    assert float(image.float().mean()) == pytest.approx(RAMP_MEAN, abs=1)

    pascal_seg.write_voc_seg(tmp_path / "voc", train=2, val=1, size=(64, 64))
    voc = tmp_path / "voc/VOCdevkit/VOC2012"
    (voc / "JPEGImages/2007_000000.jpg").write_bytes(png_bytes(ramp16()))  # PIL reads the content, not the name
    sample = segmentation.SegmentationSet(pascal_seg.voc_items(tmp_path / "voc", "train"), 21)[0]
    assert float(sample["image"].float().mean()) == pytest.approx(RAMP_MEAN, abs=1)
    labels = read_label_png(voc / "SegmentationClass/2007_000000.png")
    assert np.array_equal(sample["mask"].numpy(), labels) and set(np.unique(labels)) <= {0, 1, 8, 15, 255}

    root = nyu_depth.write_nyu_bts(tmp_path / "bts", train=2, val=1, size=(64, 64))
    rgb, depth_png = nyu_depth.bts_items(root, "val")[0]
    rgb.write_bytes(png_bytes(ramp16()))
    millimetres = np.asarray(Image.open(depth_png)).astype(np.float32)
    sample = nyu_depth.NYUDepth(root, "val", "bts")[0]
    assert float(sample["image"].float().mean()) == pytest.approx(RAMP_MEAN, abs=1)
    assert torch.equal(sample["depth"], torch.from_numpy(millimetres / 1000))  # raw millimetres, not rescaled


@pytest.mark.parametrize("dtype", [np.float32, np.uint16])
def test_nyu_h5_rgb_that_is_not_uint8_is_an_error_not_wrapped_values(tmp_path, dtype):
    import h5py

    nyu_depth.write_nyu_h5(tmp_path, train=1, val=1, size=(8, 8))
    path = next((tmp_path / "nyudepthv2/val").rglob("*.h5"))
    with h5py.File(path, "r+") as f:
        rgb = f["rgb"][()]
        del f["rgb"]
        f.create_dataset("rgb", data=(rgb / 255).astype(dtype))
    with pytest.raises(DataError, match=f"{path.name}: rgb is {np.dtype(dtype).name}: expected uint8"):
        nyu_depth.NYUDepth(tmp_path, "val", "h5")[0]
