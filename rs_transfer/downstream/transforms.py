"""The paper's scale jitter + crop + flip for the dense tasks and detection (torchvision transforms.v2, so masks,
depth and boxes move with the image), and the padding collate of variable-sized images.

Images stay uint8 until the model, which normalises them (less memory in the loader queues).
"""

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2


class ScaleJitter(v2.ScaleJitter):
    """torchvision's ScaleJitter (scale relative to the target size, as the TF detection/segmentation code does),
    except that labels and depth are resized with NEAREST_EXACT. torchvision resizes every mask with NEAREST,
    which samples at floor(i / r) and so shifts labels by up to half a source pixel against the bilinear image;
    NEAREST_EXACT samples at pixel centres, like the image. Boxes and images are resized as torchvision does."""

    def transform(self, inpt, params):
        if isinstance(inpt, tv_tensors.Mask):
            return self._call_kernel(v2.functional.resize, inpt, size=params["size"],
                                     interpolation=v2.InterpolationMode.NEAREST_EXACT)
        return super().transform(inpt, params)


def dense_train_transform(crop_size: int, scale_range, fill: dict) -> v2.Compose:
    """Scale jitter relative to the crop, a random crop padded with `fill` where the scaled image is smaller,
    and a horizontal flip."""
    return v2.Compose([
        ScaleJitter((crop_size, crop_size), scale_range=tuple(scale_range)),
        v2.RandomCrop(crop_size, pad_if_needed=True, fill=fill),
        v2.RandomHorizontalFlip(),
    ])


def pad_collate(samples: list, fills: dict) -> dict:
    """Stack dict samples, padding image-shaped entries at the bottom/right to the largest in the batch.

    fills: key -> padding value (images 0, labels IGNORE, depth 0 = invalid). Other keys are stacked or listed.
    """
    height = max(s["image"].shape[-2] for s in samples)
    width = max(s["image"].shape[-1] for s in samples)
    batch = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if key in fills:
            padded = [
                torch.nn.functional.pad(v.as_subclass(torch.Tensor), (0, width - v.shape[-1], 0, height - v.shape[-2]),
                                        value=fills[key])
                for v in values
            ]
            batch[key] = torch.stack(padded)
        elif isinstance(values[0], torch.Tensor):
            batch[key] = torch.stack([v.as_subclass(torch.Tensor) for v in values])
        else:
            batch[key] = values
    return batch
