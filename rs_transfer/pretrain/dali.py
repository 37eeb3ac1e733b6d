"""Optional NVIDIA DALI training batches for pretraining (`pip install -e ".[dali]"`): decode with nvJPEG
(`device_id` set: the "mixed" decoder, augmentation on that GPU) or libjpeg-turbo (`device_id=None`: a CPU-only
pipeline, what the tests run), then the RS train transform: random resized crop, horizontal flip, TF RandAugment.

The engine decides the order of samples as keys (epoch, index), so DALI's readers and their shuffling are not
used: an external source reads the encoded bytes of the given keys, in order, through `read(index)`. Every random
choice of a sample (crop window, flip, RandAugment ops, signs, cutout centre) is a draw of a counter-based
generator keyed by (seed, epoch, index) (`uniforms`) and handed to DALI as data, so a batch depends only on its
keys and the seed, not on batch boundaries, threads or workers: resuming with the remaining keys gives what an
uninterrupted run would have.

RandAugment is the TF one of transforms.py (16 ops, each layer's op always applied, magnitude on TF's 0-10 scale,
grey 128 fill, absolute-pixel translate and cutout), written with DALI operators and chosen per sample with DALI's
`auto_aug.core.select`. DALI's own `auto_aug.rand_augment` is not used: its suite is not TF's (14 ops, magnitude
bins, randomly negated enhance factors, an inverted Solarize scale) and its op choice cannot be seeded per sample.
What still differs from the PyTorch path is listed in docs/pretrain.md ("DALI backend (optional)").

Batches are what the PyTorch loader ships: {"image": uint8 (N, 3, S, S), "label": int64 (N,)}, both on the
pipeline's device (cuda:`device_id`, or the CPU); the model normalises. The images are channels-last in memory
(DALI's HWC, viewed as NCHW), the engine's input format with `train.channels_last`.

The per-sample work in Python (reading the bytes, the header's size, the random parameters) runs in DALI's parallel
external source (`py_workers` processes, each preparing a whole batch ahead), not on the thread that runs the
pipeline and the training step; the parameters are computed for a batch at once with numpy (`batch_params`). The last batch holds the keys left over
(fewer than `batch_size`).
"""

import io
import math
import re
from typing import Callable, Optional, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from rs_transfer.errors import UserError

INSTALL_HINT = "pip install -e '.[dali]'"
RATIO = (3 / 4, 4 / 3)
FILL = 128
DECODE_FAILURE = re.compile(r"Failed to decode sample #(\d+)")
# transforms.py's TF ops, in its order; the affine ones share one DALI op fed a matrix per sample.
OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "Color", "Contrast", "Brightness",
       "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY", "Cutout", "SolarizeAdd")
AFFINE_OPS = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY")
IDENTITY = np.array([[1, 0, 0], [0, 1, 0]], dtype=np.float32)
# Feeder processes of the training loader (pretrain/task.py): each prepares a whole batch, ~0.1 ms a sample
# (33 ms of a 256-image batch, half the ~66 ms step of RS-50@160 at 3.9k images/s per GPU), so one keeps pace and a second gives headroom.
FEEDER_WORKERS = 2


def import_dali():
    """The `nvidia.dali` module; a UserError with the install command when it is missing."""
    try:
        import nvidia.dali
    except ImportError as error:
        raise UserError(f"data.backend=dali needs NVIDIA DALI, which is not installed ({error}): {INSTALL_HINT}") \
            from None
    return nvidia.dali


# Draws of one sample, as columns of `uniforms`: 10 tries of (area, aspect) for the crop, its position, the flip,
# then per RandAugment layer its op, sign and cutout centre.
CROP_TRIES = 10
MASK64 = (1 << 64) - 1


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64 arrays (wrapping arithmetic): a bijection that scatters nearby inputs."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def uniforms(seed: int, epochs: np.ndarray, indices: np.ndarray, count: int) -> np.ndarray:
    """(N, count) float64 in [0, 1): draw j of sample (epochs[i], indices[i]), a pure function of (seed, epoch,
    index, j) (counter-based, SplitMix64 hashing), computed for a whole batch at once: no generator per sample
    (constructing numpy's took 14 us a sample, the scalar draws after it 36 us more, on the feeder's thread)."""
    golden = np.uint64(0x9E3779B97F4A7C15)
    key = _mix(np.full(len(epochs), seed & MASK64, dtype=np.uint64) + golden)
    key = _mix(key ^ (np.asarray(epochs, dtype=np.int64).astype(np.uint64) + golden))
    key = _mix(key ^ (np.asarray(indices, dtype=np.int64).astype(np.uint64) + golden))
    counters = np.arange(1, count + 1, dtype=np.uint64) * golden
    return (_mix(key[:, None] + counters[None, :]) >> np.uint64(11)) * (1.0 / (1 << 53))


def crop_windows(draws: np.ndarray, widths: np.ndarray, heights: np.ndarray, scale: tuple) -> np.ndarray:
    """(N, 4) int32 (x, y, w, h) of torchvision's RandomResizedCrop.get_params (ratio 3/4-4/3) for images of
    `widths` x `heights`, from `draws` (N, 2 x CROP_TRIES + 2): its 10 tries of (area, aspect), the first that fits
    taken, then its position; torchvision's centred fallback where none fits."""
    widths, heights = np.asarray(widths, dtype=np.int64), np.asarray(heights, dtype=np.int64)
    area = (widths * heights).astype(np.float64)[:, None]
    target = area * (scale[0] + (scale[1] - scale[0]) * draws[:, :CROP_TRIES])
    log_low, log_high = math.log(RATIO[0]), math.log(RATIO[1])
    aspect = np.exp(log_low + (log_high - log_low) * draws[:, CROP_TRIES:2 * CROP_TRIES])
    w = np.rint(np.sqrt(target * aspect)).astype(np.int64)  # rint: half to even, as Python's round
    h = np.rint(np.sqrt(target / aspect)).astype(np.int64)
    fits = (w > 0) & (w <= widths[:, None]) & (h > 0) & (h <= heights[:, None])
    first = fits.argmax(axis=1)
    rows = np.arange(len(widths))
    w, h, found = w[rows, first], h[rows, first], fits.any(axis=1)
    x = np.floor(draws[:, 2 * CROP_TRIES] * (widths - w + 1)).astype(np.int64)
    y = np.floor(draws[:, 2 * CROP_TRIES + 1] * (heights - h + 1)).astype(np.int64)
    # Fallback: the centred crop of the ratio bound the image's own ratio lies beyond, or the whole image.
    ratio = widths / heights
    fallback_w = np.where(ratio < RATIO[0], widths, np.where(ratio > RATIO[1], np.rint(heights * RATIO[1]), widths))
    fallback_h = np.where(ratio < RATIO[0], np.rint(widths / RATIO[0]), heights)
    fallback_w, fallback_h = fallback_w.astype(np.int64), fallback_h.astype(np.int64)
    x = np.where(found, x, (widths - fallback_w) // 2)
    y = np.where(found, y, (heights - fallback_h) // 2)
    w, h = np.where(found, w, fallback_w), np.where(found, h, fallback_h)
    return np.stack([x, y, w, h], axis=1).astype(np.int32)


def affine_matrices(ops: np.ndarray, signs: np.ndarray, magnitude: float, size: int) -> np.ndarray:
    """(..., 2, 3) float32: PIL's inverse affine (output pixel -> input pixel) of each layer's op where it is an
    affine one (transforms.py's Rotate, ShearX/Y, TranslateX/Y), the identity elsewhere; `ops`, `signs` (+-1): (...)."""
    level = magnitude / 10.0 * signs
    names = np.asarray(OPS)[ops]
    matrices = np.broadcast_to(IDENTITY, (*ops.shape, 2, 3)).copy()
    matrices[..., 0, 1] = np.where(names == "ShearX", level * 0.3, 0)
    matrices[..., 1, 0] = np.where(names == "ShearY", level * 0.3, 0)
    matrices[..., 0, 2] = np.where(names == "TranslateX", level * 100, 0)
    matrices[..., 1, 2] = np.where(names == "TranslateY", level * 100, 0)
    # Rotate: Image.rotate(level * 30 degrees) about the centre, built the way PIL builds it.
    rotate = names == "Rotate"
    angle = -np.radians(level * 30.0)
    a, b = np.cos(angle), np.sin(angle)
    centre = size / 2.0
    rotation = np.stack([np.stack([a, b, centre - a * centre - b * centre], -1),
                         np.stack([-b, a, centre + b * centre - a * centre], -1)], -2)
    matrices[rotate] = rotation[rotate]
    return matrices.astype(np.float32)


def cutout_boxes(draws: np.ndarray, magnitude: float, size: int) -> np.ndarray:
    """(..., 4) int32 (y, x, h, w) of TF's cutout square: side 2 x int(M/10 x 40) at the centre `draws` (..., 2)
    picks uniformly in the image, clipped to it."""
    pad = int(magnitude / 10.0 * 40)
    cx, cy = (np.floor(draws[..., k] * size).astype(np.int64) for k in (0, 1))
    x0, y0 = np.maximum(0, cx - pad), np.maximum(0, cy - pad)
    x1, y1 = np.minimum(size, cx + pad), np.minimum(size, cy + pad)
    return np.stack([y0, x0, y1 - y0, x1 - x0], axis=-1).astype(np.int32)


def batch_params(seed: int, epochs, indices, widths, heights, size: int, scale: tuple, num_layers: int,
                 magnitude: float) -> dict:
    """Every random choice of samples (epochs[i], indices[i]) of images widths[i] x heights[i], one array per
    column over the batch (N first): each row a pure function of (seed, epoch, index, its size), so batch
    boundaries, workers and resumes do not change it."""
    layers = num_layers
    draws = uniforms(seed, epochs, indices, 2 * CROP_TRIES + 3 + 4 * layers)
    window = crop_windows(draws[:, :2 * CROP_TRIES + 2], widths, heights, scale)
    rest = draws[:, 2 * CROP_TRIES + 2:]
    ops = np.minimum(np.floor(rest[:, 1:1 + layers] * len(OPS)), len(OPS) - 1).astype(np.int32)
    signs = np.where(rest[:, 1 + layers:1 + 2 * layers] < 0.5, -1.0, 1.0)
    centres = rest[:, 1 + 2 * layers:].reshape(len(window), layers, 2)
    boxes = cutout_boxes(centres, magnitude, size) * (np.asarray(OPS)[ops] == "Cutout")[..., None]
    return {"crop_anchor": window[:, :2].copy(), "crop_shape": window[:, 2:].copy(),
            "flip": (rest[:, 0] < 0.5).astype(np.int32), "ops": ops,
            "matrices": affine_matrices(ops, signs, magnitude, size), "boxes": boxes.astype(np.int32)}


def sample_params(seed: int, epoch: int, index: int, width: int, height: int, size: int, scale: tuple,
                  num_layers: int, magnitude: float) -> dict:
    """`batch_params` of one sample: its row of each column."""
    batch = batch_params(seed, [epoch], [index], [width], [height], size, scale, num_layers, magnitude)
    return {name: column[0] for name, column in batch.items()}


class KeySource:
    """DALI's batch callback: batch `info.iteration` of `keys` as encoded bytes, labels and random parameters.

    Stateless apart from its arguments, as DALI's parallel workers require; picklable when `read` and `keys` are.
    Per sample it reads the bytes and the header's size; the random parameters are computed for the whole batch
    at once (`batch_params`), each column one array.
    """

    OUTPUTS = ("encoded", "label", "crop_anchor", "crop_shape", "flip", "ops", "matrices", "boxes")
    DTYPES = ("UINT8", "INT64", "INT32", "INT32", "INT32", "INT32", "FLOAT", "INT32")
    NDIMS = (1, 0, 1, 1, 0, 1, 3, 2)

    def __init__(self, read: Callable[[int], tuple], keys: Sequence, batch_size: int, image_size: int,
                 scale: tuple, num_layers: int, magnitude: float, seed: int):
        self.read, self.keys, self.batch_size, self.image_size = read, keys, batch_size, image_size
        self.scale, self.num_layers, self.magnitude, self.seed = scale, num_layers, magnitude, seed
        # Without RandAugment layers its three columns would be unused, which DALI warns about.
        self.outputs = self.OUTPUTS if num_layers > 0 else self.OUTPUTS[:5]

    def __call__(self, info) -> tuple:
        start = info.iteration * self.batch_size
        if start >= len(self.keys):
            raise StopIteration
        keys = [self.keys[position] for position in range(start, min(start + self.batch_size, len(self.keys)))]
        epochs, indices = (np.array([int(key[k]) for key in keys], dtype=np.int64) for k in (0, 1))
        encoded, labels, sizes = [], [], []
        for epoch, index in zip(epochs.tolist(), indices.tolist()):
            data, label = self.read(index)
            sizes.append(image_size(data, describe_key(self.read, epoch, index)))
            encoded.append(np.frombuffer(data, dtype=np.uint8))
            labels.append(label)
        widths, heights = np.array(sizes, dtype=np.int64).T
        params = batch_params(self.seed, epochs, indices, widths, heights, self.image_size, self.scale,
                              self.num_layers, self.magnitude)
        columns = {"encoded": encoded, "label": np.array(labels, dtype=np.int64), **params}
        return tuple(columns[name] for name in self.outputs)


def image_size(encoded: bytes, what: str) -> tuple:
    """(width, height) from the image header, without decoding (EXIF orientation ignored, as the PyTorch path).
    Raises UserError naming `what` (the sample) for bytes that are not a readable image."""
    try:
        with Image.open(io.BytesIO(encoded)) as image:
            return image.size
    except UnidentifiedImageError:  # its message shows a BytesIO repr, not the sample
        raise UserError(f"{what}: unknown image format") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise UserError(f"{what}: not a readable image ({type(error).__name__}: {error})") from None


def describe_key(read, epoch: int, index: int) -> str:
    """A sample in messages: its name when `read` has `ref(index)` (data.EncodedImages), and its key."""
    name = getattr(read, "ref", None)
    return f"{name(index)} (sample ({epoch}, {index}) (epoch, index))" if name else \
        f"sample ({epoch}, {index}) (epoch, index)"


def tf_randaugment_ops(magnitude: float, size: int, device: str = "cpu") -> list:
    """The 16 TF ops of transforms.py as DALI graph functions of (uint8 HWC image of `size` x `size` on `device`,
    matrix, box), in OPS order. Call it inside the pipeline's definition (its constants belong to the graph)."""
    dali = import_dali()
    from nvidia.dali import fn, types

    level = magnitude / 10.0
    factor = level * 1.8 + 0.1  # TF's enhance factor: never negated
    bits = min(int(level * 4), 8)
    threshold = int(level * 256)
    addition = int(level * 110)
    pad = int(level * 40)
    smooth = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=np.float32) / 13
    sharpen = factor * np.array([[0, 0, 0], [0, 1, 0], [0, 0, 0]], dtype=np.float32) + (1 - factor) * smooth
    inner = np.zeros((size, size, 1), dtype=np.uint8)
    inner[1:-1, 1:-1] = 1
    # Tensor constants live beside the image: DALI's GPU operators take no CPU tensor inputs.
    luma = types.Constant(np.array([0.299, 0.587, 0.114], dtype=np.float32), device=device)
    sharpen = types.Constant(sharpen, device=device)
    inner, border = (types.Constant(mask, layout="HWC", device=device) for mask in (inner, 1 - inner))

    def to_uint8(value):
        return fn.cast(dali.math.clamp(value, 0, 255), dtype=types.UINT8)

    def blend(degenerate, image):  # TF's `blend`: degenerate + factor x (image - degenerate), clipped
        return to_uint8(degenerate + (fn.cast(image, dtype=types.FLOAT) - degenerate) * factor)

    def grey(image):
        return fn.reductions.sum(fn.cast(image, dtype=types.FLOAT) * luma, axis_names="C", keep_dims=True)

    def auto_contrast(image, **_):  # per channel: [min, max] -> [0, 255]; a flat channel stays as it is
        lo = fn.cast(fn.reductions.min(image, axis_names="HW", keep_dims=True), dtype=types.FLOAT)
        hi = fn.cast(fn.reductions.max(image, axis_names="HW", keep_dims=True), dtype=types.FLOAT)
        flat = fn.cast(hi <= lo, dtype=types.FLOAT)
        scale = 255.0 / (hi - lo + flat) * (1.0 - flat) + flat
        return to_uint8((fn.cast(image, dtype=types.FLOAT) - lo * (1.0 - flat)) * scale)

    def affine(image, matrix, **_):
        return fn.warp_affine(image, matrix=matrix, fill_value=FILL, interp_type=types.INTERP_NN, inverse_map=True)

    def posterize(image, **_):
        mask = 255 ^ (2 ** (8 - bits) - 1)  # bits = 0 leaves a black image, as TF's shift by 8
        return image & types.Constant(mask, dtype=types.UINT8)

    def solarize(image, **_):
        if threshold > 255:  # TF at M > 10: nothing reaches the threshold
            return image
        keep = image < types.Constant(threshold, dtype=types.UINT8)
        return keep * image + (keep ^ True) * (types.Constant(255, dtype=types.UINT8) - image)

    def solarize_add(image, **_):
        low = image < types.Constant(128, dtype=types.UINT8)
        added = to_uint8(fn.cast(image, dtype=types.INT32) + addition)
        return low * added + (low ^ True) * image

    def contrast(image, **_):
        return blend(fn.reductions.mean(grey(image), axis_names="HWC", keep_dims=True), image)

    def sharpness(image, **_):  # PIL smooths the inner pixels only: the 1-pixel border stays as it was
        return inner * fn.filter(image, sharpen) + border * image

    def cutout(image, box, **_):
        if pad == 0:
            return image
        return fn.erase(image, anchor=fn.cast(box[0:2], dtype=types.FLOAT), shape=fn.cast(box[2:4], dtype=types.FLOAT),
                        axis_names="HW", fill_value=FILL)

    table = {
        "AutoContrast": auto_contrast,
        "Equalize": lambda image, **_: fn.equalize(image),
        "Invert": lambda image, **_: types.Constant(255, dtype=types.UINT8) - image,
        "Posterize": posterize,
        "Solarize": solarize,
        "Color": lambda image, **_: blend(grey(image), image),
        "Contrast": contrast,
        "Brightness": lambda image, **_: to_uint8(fn.cast(image, dtype=types.FLOAT) * factor),
        "Sharpness": sharpness,
        "Cutout": cutout,
        "SolarizeAdd": solarize_add,
    }
    return [affine if name in AFFINE_OPS else table[name] for name in OPS]


def build_pipeline(source: KeySource, batch_size: int, image_size: int, num_layers: int, magnitude: float,
                   device_id: Optional[int], num_threads: int, seed: int, py_workers: int = 0,
                   py_start_method: str = "spawn", prefetch: int = 2):
    """The DALI pipeline (built) whose outputs are (images HWC uint8, labels int64) for `source`'s batches."""
    dali = import_dali()
    from nvidia.dali import fn, types
    from nvidia.dali.auto_aug.core import select

    gpu = device_id is not None
    # Each worker prepares a whole batch: as many batches in flight as workers keeps them all busy.
    parallel_options = dict(parallel=True, prefetch_queue_depth=max(prefetch, py_workers)) if py_workers > 0 else {}

    @dali.pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                       enable_conditionals=True, py_num_workers=max(py_workers, 1), py_start_method=py_start_method,
                       prefetch_queue_depth=prefetch, exec_dynamic=True)
    def train_pipeline():
        count = len(source.outputs)
        encoded, label, anchor, shape, flip, *randaugment = fn.external_source(
            source, num_outputs=count, batch=True, batch_info=True, **parallel_options,
            dtype=[getattr(types, name) for name in KeySource.DTYPES[:count]], ndim=list(KeySource.NDIMS[:count]))
        # Fancy upsampling: nvJPEG's chroma upsampling as libjpeg-turbo's (and PIL's), for the same pixels.
        image = fn.decoders.image_slice(encoded, anchor, shape, device="mixed" if gpu else "cpu",
                                        output_type=types.RGB, adjust_orientation=False, jpeg_fancy_upsampling=True)
        image = fn.resize(image, size=[image_size, image_size], interp_type=types.INTERP_CUBIC, antialias=True)
        image = fn.flip(image, horizontal=flip)
        if num_layers > 0:
            op, matrices, boxes = randaugment
            ops = tf_randaugment_ops(magnitude, image_size, image.device)  # inside the trace: they make graph constants
            for layer in range(num_layers):
                image = select(ops, op[layer], image, matrix=matrices[layer], box=boxes[layer])
        # HWC out, no transpose: the loader hands the engine an NHWC tensor viewed as NCHW, which is channels-last
        # already (engine/device.to_device then copies nothing); a CHW transpose here was undone there
        return image, label.gpu() if gpu else label

    pipeline = train_pipeline()
    pipeline.build()
    return pipeline


class DaliBatches:
    """Training batches of `keys` (a sequence of (epoch, index), read in order) from a DALI pipeline.

    `read(index)` returns (encoded image bytes, integer label). `py_workers` > 0 reads batches in that many worker
    processes (DALI's parallel external source; `read` and `keys` must then pickle, and `keys` should compute
    key i on demand rather than hold the run's keys); 0 reads in the calling thread. Keep "spawn" once CUDA is
    initialised ("fork" starts faster and is fine in a CPU-only process). Each `iter()` builds a fresh pipeline
    and starts at the first key: to resume, pass the keys not yet trained on.
    """

    def __init__(self, read: Callable[[int], tuple], keys: Sequence, batch_size: int, image_size: int,
                 crop_min_area: float = 0.08, num_layers: int = 2, magnitude: float = 10.0,
                 device_id: Optional[int] = None, num_threads: int = 1, seed: int = 0, py_workers: int = 0,
                 py_start_method: str = "spawn", prefetch: int = 2):
        import_dali()
        if batch_size < 1 or image_size < 3:
            raise UserError(f"DALI batches need batch_size >= 1 and image_size >= 3, got {batch_size}, {image_size}")
        self.keys, self.batch_size, self.device_id = keys, batch_size, device_id
        self.source = KeySource(read, keys, batch_size, image_size, (crop_min_area, 1.0), num_layers, magnitude,
                                seed)
        self.options = dict(batch_size=batch_size, image_size=image_size, num_layers=num_layers,
                            magnitude=magnitude, device_id=device_id, num_threads=num_threads, seed=seed,
                            py_workers=py_workers, py_start_method=py_start_method, prefetch=prefetch)

    def __len__(self) -> int:
        return math.ceil(len(self.keys) / self.batch_size)

    def __iter__(self):
        # torch is imported here, not at the top: DALI's spawned workers import this module for KeySource.
        import torch
        from nvidia.dali.plugin.pytorch import feed_ndarray

        if len(self.keys) == 0:
            return
        device = torch.device("cpu") if self.device_id is None else torch.device("cuda", self.device_id)
        stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
        pipeline = build_pipeline(self.source, **self.options)
        for batch in range(len(self)):
            try:
                images, labels = (output.as_tensor() for output in pipeline.run())
            except RuntimeError as error:
                raise self._decode_error(batch, error) from None
            # Copies: DALI reuses its output buffers for later batches. (N, S, S, 3) in memory, (N, 3, S, S) shown.
            image = torch.empty(images.shape(), dtype=torch.uint8, device=device)
            label = torch.empty(labels.shape(), dtype=torch.int64, device=device)
            yield {"image": feed_ndarray(images, image, stream).permute(0, 3, 1, 2),
                   "label": feed_ndarray(labels, label, stream)}

    def _decode_error(self, batch: int, error: RuntimeError) -> Exception:
        """A UserError naming the key DALI could not decode; other pipeline failures are returned as they are."""
        found = DECODE_FAILURE.search(str(error))
        if found is None:
            return error
        epoch, index = (int(k) for k in self.keys[batch * self.batch_size + int(found.group(1))])
        return UserError(f"DALI cannot decode {describe_key(self.source.read, epoch, index)} of batch {batch}: a corrupt or unsupported image (the PyTorch "
                         "loader, data.backend=torch, skips such images; DALI stops)")
