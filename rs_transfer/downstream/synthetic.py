"""Tiny learnable datasets written in each task's real on-disk format, for demos and tests.

Scenes are a noisy background with a few filled rectangles and ellipses; an object's colour tells its class
(segmentation, detection, classification) or its depth (NYU), so a small network can learn the task in a few
hundred steps. Only the formats are real; the numbers a model reaches here say nothing about real data.
"""

import pickle
from pathlib import Path

import numpy as np
from PIL import Image

from rs_transfer.data.text import read_lines

# A few well-separated colours; class k of a task's chosen classes gets COLOURS[k].
COLOURS = np.array([
    (220, 40, 40), (40, 200, 60), (50, 80, 230), (240, 220, 50), (200, 60, 220), (40, 210, 220),
    (250, 140, 30), (140, 90, 40), (250, 250, 250), (20, 20, 20),
], dtype=np.float32)
VOC_SEG_CLASSES = (1, 8, 15)  # aeroplane, cat, person
VOC_DET_CLASSES = ("aeroplane", "cat", "person")
ADE_CLASSES = (1, 3, 13, 150)  # raw ADE labels (0 = other), so the -1 shift and the last class are exercised
CIFAR_CLASSES = tuple(range(0, 100, 10))


def voc_palette() -> list:
    """The VOC colour map (the bit-interleaving the devkit's VOClabelcolormap.m uses), flattened for PIL."""
    palette = []
    for index in range(256):
        r = g = b = 0
        c = index
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette += [r, g, b]
    return palette


def _background(rng, height, width) -> np.ndarray:
    base = rng.uniform(90, 160, size=3).astype(np.float32)
    return base + rng.normal(0, 12, size=(height, width, 3)).astype(np.float32)


def _shape_mask(rng, height, width, min_frac=0.2, max_frac=0.5):
    h = int(rng.uniform(min_frac, max_frac) * height)
    w = int(rng.uniform(min_frac, max_frac) * width)
    y0 = int(rng.integers(0, height - h + 1))
    x0 = int(rng.integers(0, width - w + 1))
    yy, xx = np.mgrid[:height, :width]
    if rng.random() < 0.5:
        mask = (yy >= y0) & (yy < y0 + h) & (xx >= x0) & (xx < x0 + w)
    else:
        cy, cx = y0 + h / 2, x0 + w / 2
        mask = ((yy + 0.5 - cy) / (h / 2)) ** 2 + ((xx + 0.5 - cx) / (w / 2)) ** 2 <= 1
    ys, xs = np.nonzero(mask)
    box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1) if len(ys) else None
    return mask, box


def scene(rng, height, width, num_classes, max_objects=3, min_objects=1):
    """An image (uint8 HxWx3) with objects; label map (index into the chosen classes, -1 = background),
    and [(class index, box x0 y0 x1 y1, mask)]."""
    image = _background(rng, height, width)
    label = np.full((height, width), -1, dtype=np.int16)
    objects = []
    for _ in range(int(rng.integers(min_objects, max_objects + 1))):
        k = int(rng.integers(num_classes))
        mask, box = _shape_mask(rng, height, width)
        if box is None:
            continue
        image[mask] = COLOURS[k] + rng.normal(0, 10, size=(int(mask.sum()), 3))
        label[mask] = k
        objects.append((k, box, mask))
    return np.clip(image, 0, 255).astype(np.uint8), label, objects


def _boundary(label: np.ndarray) -> np.ndarray:
    # VOC marks object outlines 255 (ignore); mark pixels whose 4-neighbour differs.
    edge = np.zeros(label.shape, dtype=bool)
    edge[1:] |= label[1:] != label[:-1]
    edge[:-1] |= label[1:] != label[:-1]
    edge[:, 1:] |= label[:, 1:] != label[:, :-1]
    edge[:, :-1] |= label[:, 1:] != label[:, :-1]
    return edge


def write_voc_seg(root, train=48, val=12, size=(96, 128), seed=0) -> Path:
    """VOCdevkit/VOC2012 with JPEGImages, palette PNGs in SegmentationClass (255 outlines) and ImageSets."""
    rng = np.random.default_rng(seed)
    voc = Path(root) / "VOCdevkit" / "VOC2012"
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / folder).mkdir(parents=True, exist_ok=True)
    palette = voc_palette()
    ids = [f"2007_{i:06d}" for i in range(train + val)]
    for image_id in ids:
        image, label, _ = scene(rng, *size, len(VOC_SEG_CLASSES))
        classes = np.where(label >= 0, np.take(VOC_SEG_CLASSES, np.clip(label, 0, None)), 0).astype(np.uint8)
        classes[_boundary(label)] = 255
        Image.fromarray(image).save(voc / "JPEGImages" / f"{image_id}.jpg", quality=95)
        png = Image.fromarray(classes)  # mode L; putpalette turns it into P
        png.putpalette(palette)
        png.save(voc / "SegmentationClass" / f"{image_id}.png")
    sets = voc / "ImageSets" / "Segmentation"
    (sets / "train.txt").write_text("\n".join(ids[:train]) + "\n")
    (sets / "val.txt").write_text("\n".join(ids[train:]) + "\n")
    (sets / "trainval.txt").write_text("\n".join(ids) + "\n")
    return Path(root)


def write_sbd(root, voc_root, extra=4, size=(96, 128), seed=1) -> Path:
    """SBD's benchmark_RELEASE/dataset: img/<id>.jpg, cls/<id>.mat (GTcls.Segmentation), train.txt, val.txt.

    Holds `extra` new images plus the first VOC val image (which trainaug must drop)."""
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    sbd = Path(root) / "benchmark_RELEASE" / "dataset"
    (sbd / "img").mkdir(parents=True, exist_ok=True)
    (sbd / "cls").mkdir(parents=True, exist_ok=True)
    voc_val = read_lines(Path(voc_root) / "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt")
    ids = [f"2008_{i:06d}" for i in range(extra)]
    for image_id in ids:
        image, label, _ = scene(rng, *size, len(VOC_SEG_CLASSES))
        classes = np.where(label >= 0, np.take(VOC_SEG_CLASSES, np.clip(label, 0, None)), 0).astype(np.uint8)
        Image.fromarray(image).save(sbd / "img" / f"{image_id}.jpg", quality=95)
        savemat(sbd / "cls" / f"{image_id}.mat", {"GTcls": {"Segmentation": classes, "CategoriesPresent": np.unique(classes)}})
    (sbd / "train.txt").write_text("\n".join(ids[: extra // 2]) + "\n")
    (sbd / "val.txt").write_text("\n".join(ids[extra // 2:] + voc_val[:1]) + "\n")
    return Path(root) / "benchmark_RELEASE"


def write_ade(root, train=48, val=12, size=(96, 128), seed=0) -> Path:
    """ADEChallengeData2016/images|annotations/training|validation, greyscale PNG labels (0 = other)."""
    rng = np.random.default_rng(seed)
    ade = Path(root) / "ADEChallengeData2016"
    for split, count, prefix in (("training", train, "ADE_train"), ("validation", val, "ADE_val")):
        (ade / "images" / split).mkdir(parents=True, exist_ok=True)
        (ade / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image, label, _ = scene(rng, *size, len(ADE_CLASSES) - 1)
            raw = np.where(label >= 0, np.take(ADE_CLASSES[1:], np.clip(label, 0, None)), ADE_CLASSES[0])
            # Background is a real class (ADE label 1); a band of "other" (0) pixels exercises the ignore label.
            raw[: size[0] // 10] = 0
            name = f"{prefix}_{i + 1:08d}"
            Image.fromarray(image).save(ade / "images" / split / f"{name}.jpg", quality=95)
            Image.fromarray(raw.astype(np.uint8)).save(ade / "annotations" / split / f"{name}.png")
    return Path(root)


def write_cifar100(root, train=400, test=100, seed=0) -> Path:
    """cifar-100-python/{train,test,meta}: pickles of dicts with byte-string keys, rows of 3072 uint8 (RGB planes)."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", train), ("test", test)):
        labels = [CIFAR_CLASSES[i % len(CIFAR_CLASSES)] for i in range(count)]
        rows = []
        for label in labels:
            k = CIFAR_CLASSES.index(label)
            image = _background(rng, 32, 32)
            mask, _ = _shape_mask(rng, 32, 32, 0.4, 0.8)
            image[mask] = COLOURS[k] + rng.normal(0, 10, size=(int(mask.sum()), 3))
            rows.append(np.clip(image, 0, 255).astype(np.uint8).transpose(2, 0, 1).reshape(-1))
        data = {
            b"filenames": [f"img_{i}.png".encode() for i in range(count)],
            b"batch_label": f"{split} batch".encode(),
            b"fine_labels": labels,
            b"coarse_labels": [label // 5 for label in labels],
            b"data": np.stack(rows),
        }
        with open(folder / split, "wb") as f:
            pickle.dump(data, f, protocol=2)
    meta = {b"fine_label_names": [f"class_{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"super_{i}".encode() for i in range(20)]}
    with open(folder / "meta", "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return Path(root)


def depth_scene(rng, height, width):
    """An image and its depth (metres): a floor-like background whose brightness follows its depth (8 m at the
    top to 2 m at the bottom) and objects whose colour gives their depth (1 m + 0.9 m per colour index)."""
    rows = np.linspace(8.0, 2.0, height, dtype=np.float32)[:, None].repeat(width, 1)
    depth = rows.copy()
    image = np.repeat((40 + 20 * rows)[..., None], 3, axis=2) + rng.normal(0, 6, size=(height, width, 3))
    image = image.astype(np.float32)
    for _ in range(int(rng.integers(1, 4))):
        k = int(rng.integers(5))
        mask, box = _shape_mask(rng, height, width)
        if box is None:
            continue
        image[mask] = COLOURS[k] + rng.normal(0, 8, size=(int(mask.sum()), 3))
        depth[mask] = 1.0 + 0.9 * k
    depth[rng.random(depth.shape) < 0.02] = 0.0  # a few holes without measurement, as in raw Kinect depth
    return np.clip(image, 0, 255).astype(np.uint8), depth


def write_nyu_h5(root, train=32, val=8, size=(96, 128), seed=0) -> Path:
    """nyudepthv2/train/<scene>/<n>.h5 and val/official/<n>.h5 with `rgb` (3xHxW uint8) and `depth` (HxW
    float32 metres). The real release is 480x640; `size` is smaller so the demo runs fast."""
    import h5py

    rng = np.random.default_rng(seed)
    base = Path(root) / "nyudepthv2"
    for split, count in (("train", train), ("val", val)):
        for i in range(count):
            scene_dir = base / split / ("official" if split == "val" else f"scene_{i % 3:04d}")
            scene_dir.mkdir(parents=True, exist_ok=True)
            image, depth = depth_scene(rng, *size)
            with h5py.File(scene_dir / f"{i:05d}.h5", "w") as f:
                f.create_dataset("rgb", data=image.transpose(2, 0, 1))
                f.create_dataset("depth", data=depth)
    return Path(root)


def write_nyu_bts(root, train=8, val=4, size=(96, 128), seed=0) -> Path:
    """The BTS sync layout: sync/<scene>/rgb_<n>.jpg + sync_depth_<n>.png (uint16 mm), official_splits/test/
    likewise, and the two file lists (train paths start with '/', as BTS's do; one test line has no depth)."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    lines = {"train": [], "val": []}
    for split, count, folder in (("train", train, "sync"), ("val", val, "official_splits/test")):
        for i in range(count):
            scene_name = f"kitchen_{i % 2:04d}"
            (root / folder / scene_name).mkdir(parents=True, exist_ok=True)
            image, depth = depth_scene(rng, *size)
            rgb, dep = f"{scene_name}/rgb_{i:05d}.jpg", f"{scene_name}/sync_depth_{i:05d}.png"
            Image.fromarray(image).save(root / folder / rgb, quality=95)
            Image.fromarray(np.round(depth * 1000).astype(np.uint16)).save(root / folder / dep)
            prefix = "/" if split == "train" else ""
            lines[split].append(f"{prefix}{rgb} {prefix}{dep} 518.8579")
    lines["val"].append("bathroom/rgb_00999.jpg None 518.8579")
    (root / "nyudepthv2_train_files_with_gt.txt").write_text("\n".join(lines["train"]) + "\n")
    (root / "nyudepthv2_test_files_with_gt.txt").write_text("\n".join(lines["val"]) + "\n")
    return root


def _voc_xml(filename: str, year: str, height: int, width: int, objects: list) -> str:
    parts = [f"<annotation><folder>VOC{year}</folder><filename>{filename}</filename>",
             f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size><segmented>0</segmented>"]
    for name, (x0, y0, x1, y1), difficult in objects:
        parts.append(f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>"
                     f"<difficult>{int(difficult)}</difficult><bndbox><xmin>{x0 + 1}</xmin><ymin>{y0 + 1}</ymin>"
                     f"<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>")
    return "\n".join(parts) + "\n</annotation>\n"


def write_voc_det(root, train=48, test=12, size=(96, 128), seed=0) -> Path:
    """VOCdevkit/VOC2007 (trainval + test) and VOC2012 (trainval): Annotations XML (1-based inclusive boxes,
    some `difficult`), JPEGImages, ImageSets/Main. The first test image has no objects."""
    rng = np.random.default_rng(seed)
    splits = (("2007", "trainval", train - train // 2), ("2012", "trainval", train // 2), ("2007", "test", test))
    for year, split, count in splits:
        voc = Path(root) / "VOCdevkit" / f"VOC{year}"
        for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
            (voc / folder).mkdir(parents=True, exist_ok=True)
        ids = []
        for i in range(count):
            image_id = f"{split[:4]}{i:06d}" if year == "2007" else f"2012_{i:06d}"
            empty = split == "test" and i == 0
            image, _, objects = scene(rng, *size, len(VOC_DET_CLASSES), min_objects=0 if empty else 1,
                                      max_objects=0 if empty else 3)
            # Later objects paint over earlier ones; keep boxes whose object is still mostly visible.
            visible, covered = [], np.zeros(size, dtype=bool)
            for k, box, mask in reversed(objects):
                if (mask & ~covered).sum() > 0.6 * mask.sum():
                    visible.append((VOC_DET_CLASSES[k], box, rng.random() < 0.1))
                covered |= mask
            Image.fromarray(image).save(voc / "JPEGImages" / f"{image_id}.jpg", quality=95)
            (voc / "Annotations" / f"{image_id}.xml").write_text(_voc_xml(f"{image_id}.jpg", year, *size, visible))
            ids.append(image_id)
        (voc / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return Path(root)
