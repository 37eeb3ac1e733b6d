"""The transfer heads of PAPER.md sections 5 and 7 on the shared backbone.

`BackboneFPN`: zoo backbone (features_only) -> C3, C4, C5 -> torchvision's `FeaturePyramidNetwork` with
`LastLevelP6P7` (P6 from P5, as RetinaNet v2) -> P3..P7 at strides 8..128, all `channels` wide. It exposes
`out_channels` and returns an OrderedDict, which is what torchvision's Faster R-CNN expects of a backbone.

`DenseHead`: the segmentation / depth head. The paper's "combined and upsampled to P2": we do not build a P2
level (no C2 lateral); each of P3..P7 is bilinearly resized to stride 4 (the P2 grid) and the five are summed,
then 3 x (conv 3x3 + BN + ReLU), a 1x1 conv to the outputs, and a bilinear upsample to the input size.

`SegmentationModel` (pascal_seg, ade_seg, folder_seg) and `DepthModel` (nyu_depth): `DensePredictor` with the
task's loss, the models the engine trains. They live here, not in their task modules, so that importing a task
module imports no torch (its builders import this module when they run).
"""

from collections import OrderedDict

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from rs_transfer.downstream.data import IGNORE
from rs_transfer.models import create_model
from rs_transfer.models.normalize import Normalize

LEVELS = ("p3", "p4", "p5", "p6", "p7")
STRIDES = (8, 16, 32, 64, 128)


class BackboneFPN(nn.Module):
    def __init__(self, backbone: str, weights: str | None = None, channels: int = 256, **arch):
        super().__init__()
        # timm's feature indices: 2, 3, 4 = layer2..layer4 = C3, C4, C5 (strides 8, 16, 32).
        self.body = create_model(backbone, weights=weights, features_only=True, out_indices=(2, 3, 4), **arch)
        self.fpn = FeaturePyramidNetwork(
            self.body.feature_info.channels(), channels, extra_blocks=LastLevelP6P7(channels, channels)
        )
        self.out_channels = channels

    def forward(self, images: torch.Tensor) -> OrderedDict:
        features = OrderedDict(zip(LEVELS[:3], self.body(images)))
        return self.fpn(features)  # keys p3, p4, p5 (from the input names), then p6, p7


def conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class DenseHead(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, width: int = 256, num_convs: int = 3):
        super().__init__()
        layers = [conv_bn_relu(in_channels if i == 0 else width, width) for i in range(num_convs)]
        self.convs = nn.Sequential(*layers)
        self.predict = nn.Conv2d(width, out_channels, 1)

    def forward(self, pyramid: OrderedDict, input_size: tuple) -> torch.Tensor:
        p2_size = ((input_size[0] + 3) // 4, (input_size[1] + 3) // 4)
        merged = sum(F.interpolate(p, size=p2_size, mode="bilinear", align_corners=False) for p in pyramid.values())
        out = self.predict(self.convs(merged))
        return F.interpolate(out, size=input_size, mode="bilinear", align_corners=False)


class DensePredictor(nn.Module):
    """Image -> per-pixel outputs at the input resolution (segmentation logits or depth)."""

    def __init__(self, backbone: str, out_channels: int, weights=None, fpn_channels=256, head_channels=256, **arch):
        super().__init__()
        self.normalize = Normalize()
        self.backbone = BackboneFPN(backbone, weights=weights, channels=fpn_channels, **arch)
        self.head = DenseHead(fpn_channels, out_channels, width=head_channels)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(self.normalize(images)), tuple(images.shape[-2:]))


class SegmentationModel(nn.Module):
    """batch {"image", "mask"} -> {"loss"} in train mode; logits (N, classes, H, W) in eval mode."""

    def __init__(self, backbone: str, num_classes: int, weights=None, fpn_channels=256, head_channels=256, **arch):
        super().__init__()
        self.net = DensePredictor(backbone, num_classes, weights=weights, fpn_channels=fpn_channels,
                                  head_channels=head_channels, **arch)

    def forward(self, batch: dict):
        logits = self.net(batch["image"])
        if not self.training:
            return logits
        return {"loss": F.cross_entropy(logits, batch["mask"], ignore_index=IGNORE)}


class DepthModel(nn.Module):
    """batch {"image", "depth"} -> {"loss"} in train mode; depth in metres (N, H, W) in eval mode."""

    def __init__(self, backbone: str, weights=None, fpn_channels=256, head_channels=256, **arch):
        super().__init__()
        self.net = DensePredictor(backbone, 1, weights=weights, fpn_channels=fpn_channels, head_channels=head_channels, **arch)

    def forward(self, batch: dict):
        log_depth = self.net(batch["image"])[:, 0].float()
        if not self.training:
            return log_depth.exp()
        # The mean absolute log error over the pixels with ground truth, without a host sync (a boolean index or
        # `valid.any()` would wait for the GPU twice a step); no valid pixel gives 0 with every parameter still in
        # the graph, as DDP needs.
        valid = batch["depth"] > 0
        errors = torch.where(valid, (log_depth - batch["depth"].clamp_min(1e-6).log()).abs(), 0.0)
        return {"loss": errors.sum() / valid.sum().clamp_min(1)}
