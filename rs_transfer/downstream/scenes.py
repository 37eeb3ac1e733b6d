"""Drawing primitives for the tiny learnable datasets each transfer task writes for demos and tests.

Scenes are a noisy background with a few filled rectangles and ellipses; an object's colour tells its class
(segmentation, detection, classification) or its depth (NYU), so a small network can learn the task in a few
hundred steps. Each task module writes its own real on-disk format from these (`write_synthetic` in
cifar100.py, pascal_det.py, pascal_seg.py, ade_seg.py, nyu_depth.py); the numbers a model reaches on them say
nothing about real data.
"""

import numpy as np

# A few well-separated colours; class k of a task's chosen classes gets COLOURS[k].
COLOURS = np.array([
    (220, 40, 40), (40, 200, 60), (50, 80, 230), (240, 220, 50), (200, 60, 220), (40, 210, 220),
    (250, 140, 30), (140, 90, 40), (250, 250, 250), (20, 20, 20),
], dtype=np.float32)


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


def background(rng, height, width) -> np.ndarray:
    """float32 HxWx3, not clipped: one random colour (90..160 per channel) plus Gaussian noise (sigma 12)."""
    base = rng.uniform(90, 160, size=3).astype(np.float32)
    return base + rng.normal(0, 12, size=(height, width, 3)).astype(np.float32)


def shape_mask(rng, height, width, min_frac=0.2, max_frac=0.5):
    """A random filled rectangle or ellipse, each side `min_frac`..`max_frac` of the image's: (bool HxW mask,
    its box (x0, y0, x1, y1) in pixels, x1 and y1 exclusive, or None when the mask is empty)."""
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
    image = background(rng, height, width)
    label = np.full((height, width), -1, dtype=np.int16)
    objects = []
    for _ in range(int(rng.integers(min_objects, max_objects + 1))):
        k = int(rng.integers(num_classes))
        mask, box = shape_mask(rng, height, width)
        if box is None:
            continue
        image[mask] = COLOURS[k] + rng.normal(0, 10, size=(int(mask.sum()), 3))
        label[mask] = k
        objects.append((k, box, mask))
    return np.clip(image, 0, 255).astype(np.uint8), label, objects


def outlines(label: np.ndarray) -> np.ndarray:
    """bool HxW: the pixels of `label` whose 4-neighbour has another label (both sides of every edge), which VOC
    and many hand-made masks mark 255 (ignore)."""
    edge = np.zeros(label.shape, dtype=bool)
    edge[1:] |= label[1:] != label[:-1]
    edge[:-1] |= label[1:] != label[:-1]
    edge[:, 1:] |= label[:, 1:] != label[:, :-1]
    edge[:, :-1] |= label[:, 1:] != label[:, :-1]
    return edge


def visible_objects(objects: list, shape: tuple, min_visible: float = 0.6) -> list:
    """The objects of `scene` ([(class index, box, mask)]) whose mask is still more than `min_visible` visible
    (later objects paint over earlier ones), last painted first: those a detection box can honestly be drawn for."""
    visible, covered = [], np.zeros(shape, dtype=bool)
    for obj in reversed(objects):
        mask = obj[2]
        if (mask & ~covered).sum() > min_visible * mask.sum():
            visible.append(obj)
        covered |= mask
    return visible


def depth_scene(rng, height, width):
    """An image and its depth (metres): a floor-like background whose brightness follows its depth (8 m at the
    top to 2 m at the bottom) and objects whose colour gives their depth (1 m + 0.9 m per colour index)."""
    rows = np.linspace(8.0, 2.0, height, dtype=np.float32)[:, None].repeat(width, 1)
    depth = rows.copy()
    image = np.repeat((40 + 20 * rows)[..., None], 3, axis=2) + rng.normal(0, 6, size=(height, width, 3))
    image = image.astype(np.float32)
    for _ in range(int(rng.integers(1, 4))):
        k = int(rng.integers(5))
        mask, box = shape_mask(rng, height, width)
        if box is None:
            continue
        image[mask] = COLOURS[k] + rng.normal(0, 8, size=(int(mask.sum()), 3))
        depth[mask] = 1.0 + 0.9 * k
    depth[rng.random(depth.shape) < 0.02] = 0.0  # a few holes without measurement, as in raw Kinect depth
    return np.clip(image, 0, 255).astype(np.uint8), depth
