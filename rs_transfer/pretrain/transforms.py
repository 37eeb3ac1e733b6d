"""Train and eval transforms of the RS recipe, on PIL images.

Train: random resized crop (area 0.08-1, aspect 3/4-4/3, bicubic) -> horizontal flip -> RandAugment -> uint8
tensor (3, S, S). Eval: centre crop of S/(S + round(S/7)) of the short side, resized to S -> uint8 tensor. The
model normalises on the device (rs_transfer.models.normalize.Normalize): a quarter of float32's bytes through
the loader queues and the copy to the GPU, and no normalisation work in the loader workers. With
`data.fast_decode` the train transform takes the encoded bytes instead (`ReducedDecodeCrop`): the same crop box,
drawn from the JPEG header, then a reduced-scale decode where the box allows it.

RandAugment comes in two flavours, chosen by `augment.randaugment`:
- "tf" (default): the official TF code (tensorflow/tpu `autoaugment.distort_image_with_randaugment`), written
  here because no maintained PyTorch library has its behaviour: each of the N layers picks one of 16 ops
  uniformly and always applies it, at the fixed magnitude on a 0-10 scale that may exceed 10 (M=15 translates by
  150 px and rotates by 45 degrees), filling uncovered pixels with grey 128. Pixel constants are absolute, as in
  TF: translate 100 px and cutout 40 px at M=10, whatever the image size.
- "timm": timm's `rand_augment_transform` (each op applied with p=0.5, 15 ops without Cutout, translation
  relative to image size, magnitude clamped to 10, fill with the mean); `augment.timm_config` overrides the
  config string.
"""

import io
import random

from PIL import Image, ImageEnhance, ImageOps
from torchvision.transforms import InterpolationMode, v2

from rs_transfer.config import ConfigError
from rs_transfer.data.images import to_rgb8
from rs_transfer.models.normalize import IMAGENET_MEAN
from rs_transfer.errors import UserError

FILL = (128, 128, 128)
MAX_LEVEL = 10.0
TRANSLATE_CONST = 100
CUTOUT_CONST = 40


def _negate(value: float, rng) -> float:
    return -value if rng.random() < 0.5 else value


def _affine(image: Image.Image, matrix: tuple) -> Image.Image:
    return image.transform(image.size, Image.AFFINE, matrix, resample=Image.NEAREST, fillcolor=FILL)


def _rotate(image, level, rng):
    return image.rotate(_negate(level / MAX_LEVEL * 30.0, rng), resample=Image.NEAREST, fillcolor=FILL)


def _posterize(image, level, rng):
    # TF: int(level / 10 * 4) bits kept; at level >= 20 all 8 bits stay (the op becomes the identity).
    bits = min(int(level / MAX_LEVEL * 4), 8)
    return ImageOps.posterize(image, bits) if bits > 0 else Image.new("RGB", image.size)


def _solarize(image, level, rng):
    # Threshold 256 * level / 10: above 255 (M > 10) nothing is inverted, as in the TF code.
    threshold = int(level / MAX_LEVEL * 256)
    return image.point(lambda p: p if p < threshold else 255 - p)


def _solarize_add(image, level, rng):
    addition = int(level / MAX_LEVEL * 110)
    return image.point(lambda p: min(p + addition, 255) if p < 128 else p)


def _enhance(enhancer):
    def op(image, level, rng):
        # TF: factor level / 10 * 1.8 + 0.1, never negated; PIL's enhancers blend and clip as TF's `blend`.
        return enhancer(image).enhance(level / MAX_LEVEL * 1.8 + 0.1)

    return op


def _shear_x(image, level, rng):
    return _affine(image, (1, _negate(level / MAX_LEVEL * 0.3, rng), 0, 0, 1, 0))


def _shear_y(image, level, rng):
    return _affine(image, (1, 0, 0, _negate(level / MAX_LEVEL * 0.3, rng), 1, 0))


def _translate_x(image, level, rng):
    return _affine(image, (1, 0, _negate(level / MAX_LEVEL * TRANSLATE_CONST, rng), 0, 1, 0))


def _translate_y(image, level, rng):
    return _affine(image, (1, 0, 0, 0, 1, _negate(level / MAX_LEVEL * TRANSLATE_CONST, rng)))


def _cutout(image, level, rng):
    # TF: a (2 * pad)-sided square of grey at a uniformly random centre, clipped at the borders.
    pad = int(level / MAX_LEVEL * CUTOUT_CONST)
    width, height = image.size
    cx, cy = rng.randrange(width), rng.randrange(height)
    image = image.copy()
    image.paste(FILL, (max(0, cx - pad), max(0, cy - pad), min(width, cx + pad), min(height, cy + pad)))
    return image


TF_OPS = {
    "AutoContrast": lambda image, level, rng: ImageOps.autocontrast(image),
    "Equalize": lambda image, level, rng: ImageOps.equalize(image),
    "Invert": lambda image, level, rng: ImageOps.invert(image),
    "Rotate": _rotate,
    "Posterize": _posterize,
    "Solarize": _solarize,
    "Color": _enhance(ImageEnhance.Color),
    "Contrast": _enhance(ImageEnhance.Contrast),
    "Brightness": _enhance(ImageEnhance.Brightness),
    "Sharpness": _enhance(ImageEnhance.Sharpness),
    "ShearX": _shear_x,
    "ShearY": _shear_y,
    "TranslateX": _translate_x,
    "TranslateY": _translate_y,
    "Cutout": _cutout,
    "SolarizeAdd": _solarize_add,
}


class TFRandAugment:
    """The official TF RandAugment: `num_layers` ops, each drawn uniformly from the 16 and always applied."""

    def __init__(self, num_layers: int = 2, magnitude: float = 10.0, ops: dict | None = None):
        self.num_layers = num_layers
        self.magnitude = float(magnitude)
        self.ops = dict(TF_OPS if ops is None else ops)

    def __call__(self, image: Image.Image) -> Image.Image:
        names = list(self.ops)
        for _ in range(self.num_layers):
            # Python's `random`, like torchvision and timm: DataLoader seeds it per worker from the run's seed.
            image = self.ops[names[random.randrange(len(names))]](image, self.magnitude, random)
        return image

    def __repr__(self) -> str:
        return f"TFRandAugment(num_layers={self.num_layers}, magnitude={self.magnitude:g})"


def randaugment(kind: str, num_layers: int, magnitude: float, image_size: int, timm_config: str = ""):
    if kind == "tf":
        return TFRandAugment(num_layers, magnitude)
    if kind == "timm":
        from timm.data import rand_augment_transform

        config = timm_config or f"rand-m{magnitude:g}-n{num_layers}"
        mean = tuple(round(255 * m) for m in IMAGENET_MEAN)
        try:
            return rand_augment_transform(config, {"translate_const": int(image_size * 0.45), "img_mean": mean})
        except (AssertionError, ValueError) as error:
            # timm asserts on an unknown name or section and fails int()/float() on a bad number.
            given = (f"augment.timm_config={timm_config!r}" if timm_config else
                     f"{config!r} (made from augment.magnitude and augment.num_layers; timm takes whole numbers)")
            detail = f" ({error})" if str(error) else ""
            raise ConfigError(f"{given} is not a timm RandAugment string{detail}: expected e.g. "
                              "'rand-m9-n2-mstd0.5-inc1'") from None
    raise UserError(f"unknown augment.randaugment {kind!r}: expected 'tf', 'timm' or 'none'")


# libjpeg decodes a JPEG at 1/8, 2/8, ... of its size straight from the DCT coefficients (PIL `Image.draft`); the
# power-of-two ones are the ones PIL asks for.
JPEG_REDUCTIONS = (8, 4, 2)
RATIO = (3 / 4, 4 / 3)


def jpeg_reduction(image: Image.Image, crop_side: int, image_size: int) -> int:
    """The largest reduction r in JPEG_REDUCTIONS (1 when none) at which a crop box whose shorter side is `crop_side`
    original pixels still spans >= `image_size` decoded pixels (crop_side / r >= image_size), so the resize to
    `image_size` still only shrinks; 1 for anything but a JPEG (PIL's draft is JPEG-only)."""
    if image.format != "JPEG":
        return 1
    return next((r for r in JPEG_REDUCTIONS if crop_side >= r * image_size), 1)


class ReducedDecodeCrop:
    """Encoded image bytes -> RandomResizedCrop(image_size, bicubic) of it as 8-bit RGB, decoding a JPEG at reduced
    scale where the crop allows it (`data.fast_decode`).

    The crop box is drawn first, by torchvision's own `v2.RandomResizedCrop.make_params` on the size in the header
    (nothing decoded yet): the same torch draws as the full-decode path, so the same box in original-image
    coordinates. Then libjpeg decodes at the largest reduction r of `jpeg_reduction` (1/2, 1/4, 1/8 by `draft`),
    and the box, divided by r, is resampled (bicubic, fractional box) to image_size. With r = 1 (small crops,
    non-JPEG files) the pixels are the full path's bit for bit; with r > 1 they differ slightly, as a DCT-domain
    downscale differs from a bicubic one (measured in docs/benchmarks.md: PSNR against the full decode). Raises
    what PIL raises for unreadable data, as `rs_transfer.data.images.to_rgb8`."""

    def __init__(self, image_size: int, scale: tuple = (0.08, 1.0)):
        self.image_size = image_size
        self.crop = v2.RandomResizedCrop(image_size, scale=scale, ratio=RATIO,
                                         interpolation=InterpolationMode.BICUBIC)

    def __call__(self, data: bytes) -> Image.Image:
        size = (self.image_size, self.image_size)
        with Image.open(io.BytesIO(data)) as image:
            box = self.crop.make_params([image])  # reads image.size only
            left, top, width, height = box["left"], box["top"], box["width"], box["height"]
            reduction = jpeg_reduction(image, min(width, height), self.image_size)
            full_width = image.width
            # draft takes the largest reduction <= min(W // w, H // h) for a requested (w, h), r here, and returns
            # (mode, (0, 0, W / r, H / r)); None (a full decode) for a JPEG it cannot reduce (several tiles)
            drafted = image.draft("RGB", (image.width // reduction, image.height // reduction)) \
                if reduction > 1 else None
            if drafted is not None:
                reduction = full_width / drafted[1][2]
                scaled = tuple(v / reduction for v in (left, top, left + width, top + height))
                return to_rgb8(image).resize(size, Image.BICUBIC, box=scaled)
            rgb = to_rgb8(image)
        # v2.RandomResizedCrop on a PIL image: crop, then resize (bicubic); the same calls, the same pixels
        return rgb.crop((left, top, left + width, top + height)).resize(size, Image.BICUBIC)

    def __repr__(self) -> str:
        return f"ReducedDecodeCrop(size={self.image_size}, scale={self.crop.scale})"


class DecodingTransform:
    """A train transform that decodes by itself: `decode(bytes)` -> the cropped PIL image (ReducedDecodeCrop, where
    unreadable data raises and the dataset skips the image), then `augment(image)` -> uint8 tensor (the rest of the
    train transform). `ImageDataset` gives it the encoded bytes instead of a decoded image."""

    def __init__(self, decode, augment):
        self.decode, self.augment = decode, augment

    def __repr__(self) -> str:
        return f"DecodingTransform({self.decode!r}, {self.augment!r})"


def train_transform(image_size: int, randaugment_kind: str = "tf", num_layers: int = 2, magnitude: float = 10.0,
                    timm_config: str = "", scale: tuple = (0.08, 1.0), fast_decode: bool = False):
    """PIL image -> uint8 tensor (3, image_size, image_size); with `fast_decode`, a DecodingTransform taking the
    encoded bytes (the crop box drawn before decoding, JPEGs decoded at reduced scale where it allows).

    The crop and flip draw from torch's generator, RandAugment from Python's `random`: the engine seeds both per
    sample from (seed, epoch, index), so a resumed run augments each sample as the uninterrupted one did."""
    steps = [v2.RandomHorizontalFlip()]
    if randaugment_kind != "none" and num_layers > 0:
        steps.append(randaugment(randaugment_kind, num_layers, magnitude, image_size, timm_config))
    steps.append(v2.PILToTensor())
    if fast_decode:
        return DecodingTransform(ReducedDecodeCrop(image_size, scale), v2.Compose(steps))
    crop = v2.RandomResizedCrop(image_size, scale=scale, ratio=RATIO, interpolation=InterpolationMode.BICUBIC)
    return v2.Compose([crop, *steps])


class CenterCropFraction:
    """TF's eval crop: the centred square of S / (S + round(S / 7)) of the short side, resized to S x S.

    Ours, not v2.CenterCrop + v2.Resize: the crop size is a fraction of each image's short side, and TF's offset
    (margin + 1) // 2 differs from CenterCrop's round(margin / 2) (half to even) by a pixel for odd margins."""

    def __init__(self, image_size: int):
        self.image_size = image_size
        self.fraction = image_size / (image_size + round(image_size / 7))

    def __call__(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        crop = max(1, int(self.fraction * min(width, height)))
        left, top = (width - crop + 1) // 2, (height - crop + 1) // 2
        box = (left, top, left + crop, top + crop)
        return image.resize((self.image_size, self.image_size), Image.BICUBIC, box=box)

    def __repr__(self) -> str:
        return f"CenterCropFraction(size={self.image_size}, fraction={self.fraction:.4f})"


def eval_transform(image_size: int):
    """PIL image -> uint8 tensor (3, image_size, image_size), deterministic."""
    return v2.Compose([
        CenterCropFraction(image_size),
        v2.PILToTensor(),
    ])
