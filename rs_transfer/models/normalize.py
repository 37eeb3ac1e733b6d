"""The input normalisation the zoo's weights expect, done on the device: loaders ship uint8 images (a quarter of
float32's bytes through the worker queues and the host-to-device copy), and the first module of every task's model
turns them into ImageNet-normalised floats."""

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

# timm's constants, the statistics its ImageNet weights (resnetrs* included) were trained with: RGB, on [0, 1].
IMAGENET_MEAN = IMAGENET_DEFAULT_MEAN
IMAGENET_STD = IMAGENET_DEFAULT_STD


class Normalize(nn.Module):
    """uint8 (or [0, 255] float) images (N, 3, H, W), or clips (N, 3, T, H, W) -> (x / 255 - mean) / std as float32.

    The memory format of the input is kept (a channels-last uint8 batch gives a channels-last float batch). The
    buffers are not persistent: state dicts keep the network's own keys.
    """

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255, persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        shape = (1, 3) + (1,) * (images.ndim - 2)
        return (images.float() - self.mean.view(shape)) / self.std.view(shape)
