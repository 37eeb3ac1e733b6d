"""Where clips come from in time and space: training clips with scale jittering, and the 30-view evaluation.

Training (PAPER.md section 7): a random window of `clip_frames` frames at `frame_stride`, then scale jittering =
one random resized crop for the whole clip (area 0.08-1 of the frame, aspect 0.5-2) resized to `crop_size`, and a
horizontal flip with p 0.5. Without scale jittering (Table 6's rows before it): short side resized to
`train_short_side`, a random `crop_size` square, and the flip. The spatial ops are torchvision.transforms.v2's on a
`tv_tensors.Video`, so every frame of a clip gets the same crop and flip.

Evaluation: short side resized to 256, 10 temporal clips starting at linspace(0, max_offset, 10) truncated to
integers (as TF's Model Garden does; first and last clip touch the ends) x 3 spatial crops of 256 at the start,
centre and end of the long side = 30 views. Our own sampler, because pytorchvideo 0.1.5's
`ConstantClipsPerVideoSampler` never samples a video's tail.
"""

import random

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from rs_transfer.models.normalize import IMAGENET_MEAN, IMAGENET_STD

# The 2D zoo's ImageNet statistics (normalised on the device by models.normalize.Normalize), so inflated 2D
# weights see the input they were trained on.
MEAN, STD = IMAGENET_MEAN, IMAGENET_STD


def clip_span(clip_frames: int, frame_stride: int) -> int:
    return (clip_frames - 1) * frame_stride + 1


def random_clip_start(num_frames: int, clip_frames: int, frame_stride: int) -> int:
    return random.randint(0, max(num_frames - clip_span(clip_frames, frame_stride), 0))


def clip_indices(start: int, clip_frames: int, frame_stride: int, num_frames: int) -> list:
    """Frame indices of one clip; a video shorter than the strided span repeats its last frame."""
    return [min(start + i * frame_stride, num_frames - 1) for i in range(clip_frames)]


def eval_clip_starts(num_frames: int, clip_frames: int, frame_stride: int, num_clips: int) -> list:
    """Start frames of the evaluation clips: linspace(0, max_offset, num_clips), truncated; the centre for 1."""
    max_offset = max(num_frames - clip_span(clip_frames, frame_stride), 0)
    if num_clips == 1:
        return [max_offset // 2]
    return [int(x) for x in np.linspace(0.0, float(max_offset), num_clips)]


def crop_offsets(height: int, width: int, size: int, num_crops: int) -> list:
    """(top, left) of each evaluation crop: start, centre and end of the long side (centre only for 1 crop)."""
    if num_crops not in (1, 3):
        raise ValueError(f"num_crops must be 1 or 3, not {num_crops}")
    top, left = max(height - size, 0) // 2, max(width - size, 0) // 2
    if num_crops == 1:
        return [(top, left)]
    if height > width:
        return [(0, left), (top, left), (max(height - size, 0), left)]
    return [(top, 0), (top, left), (top, max(width - size, 0))]


def short_side_size(height: int, width: int, short_side: int) -> tuple:
    """(height, width) with the short side at `short_side`, aspect kept (rounded to the nearest pixel)."""
    if height <= width:
        return short_side, max(round(width * short_side / height), short_side)
    return max(round(height * short_side / width), short_side), short_side


def views_for(total_views: int) -> tuple:
    """(temporal clips, spatial crops) for a view count: 30 -> 10 x 3, 3 -> 1 x 3, 10 -> 10 x 1, 1 -> 1 x 1."""
    if total_views < 1:
        raise ValueError("the number of views must be positive")
    return (total_views // 3, 3) if total_views % 3 == 0 else (total_views, 1)


def to_model_input(clip: torch.Tensor) -> torch.Tensor:
    """uint8 (T, 3, H, W) -> uint8 (3, T, H, W), the layout Conv3d wants; the model normalises it on the device."""
    return clip.permute(1, 0, 2, 3).contiguous()


class TrainAugment:
    """uint8 clip (T, H, W, 3) -> uint8 (3, T, crop, crop).

    The random draws (crop box, flip) come from torch's generator, which the engine seeds per sample from (seed,
    epoch, index): a resumed run augments each clip as the uninterrupted one did."""

    def __init__(self, crop_size: int, scale_jitter: bool, area=(0.08, 1.0), aspect=(0.5, 2.0),
                 short_side: int = 256, flip: bool = True):
        self.crop_size = crop_size
        self.scale_jitter = scale_jitter
        self.short_side = short_side
        if scale_jitter:
            # torchvision's Inception sampler: 10 tries, then the largest centred box of an allowed aspect.
            steps = [v2.RandomResizedCrop(crop_size, scale=area, ratio=aspect, antialias=True)]
        else:
            steps = [v2.RandomCrop(crop_size)]
        if flip:
            steps.append(v2.RandomHorizontalFlip())
        self.crop_and_flip = v2.Compose(steps)

    def __call__(self, clip: torch.Tensor) -> torch.Tensor:
        video = tv_tensors.Video(clip.permute(0, 3, 1, 2))  # (T, 3, H, W)
        if not self.scale_jitter:
            height, width = short_side_size(*video.shape[-2:], self.short_side)
            # A short side below the crop is stretched up to it (RandomCrop would fail, or pad with black).
            size = [max(height, self.crop_size), max(width, self.crop_size)]
            video = F.resize(video, size, antialias=True)
        return to_model_input(self.crop_and_flip(video).as_subclass(torch.Tensor))


def eval_views(frames: dict, num_frames: int, clip_frames: int, frame_stride: int, num_clips: int,
               num_crops: int, crop_size: int):
    """Yield every evaluation view as uint8 (3, T, crop, crop) from frames already resized to the short side."""
    for start in eval_clip_starts(num_frames, clip_frames, frame_stride, num_clips):
        indices = clip_indices(start, clip_frames, frame_stride, num_frames)
        clip = tv_tensors.Video(torch.stack([torch.as_tensor(frames[i]) for i in indices]).permute(0, 3, 1, 2))
        height, width = clip.shape[-2:]
        for top, left in crop_offsets(height, width, crop_size, num_crops):
            # Inside the frame; a side shorter than the crop keeps the whole side (F.crop would pad it with black)
            # and the view is stretched up to the crop.
            view = F.crop(clip, top, left, min(crop_size, height), min(crop_size, width))
            if view.shape[-2:] != (crop_size, crop_size):
                view = F.resize(view, [crop_size, crop_size], antialias=True)
            yield to_model_input(view.as_subclass(torch.Tensor))


def eval_frame_indices(num_frames: int, clip_frames: int, frame_stride: int, num_clips: int) -> list:
    wanted = set()
    for start in eval_clip_starts(num_frames, clip_frames, frame_stride, num_clips):
        wanted.update(clip_indices(start, clip_frames, frame_stride, num_frames))
    return sorted(wanted)

