"""The EfficientNet family: timm's EfficientNets B0-B7, the networks Section 7.2's EfficientNet-RS points train
(pretraining and `bench` build them through `create_model`). Classifiers only: no `features`, so they are not
downstream backbones.

Source: timm/models/efficientnet.py (Tan and Le, 2019).
"""

import timm
from torch import nn

from rs_transfer.errors import UserError
from rs_transfer.models.zoo import ArchArgs

NAMES = tuple(f"efficientnet_b{i}" for i in range(8))


def build(name: str, num_classes: int = 1000, drop_rate: float = 0.0, drop_path_rate: float = 0.0,
          **resnet_switches) -> nn.Module:
    """timm's `name` (one of NAMES) with timm's own init and no pretrained weights (nothing is downloaded).
    drop_rate: dropout before the classifier; drop_path_rate: timm's drop-connect (stochastic depth, growing
    linearly over the blocks). Returns a module taking normalised (N, 3, H, W) images and returning logits
    (N, num_classes); its classifier is `classifier`, not `fc`.
    Raises UserError for another name, and for a ResNet switch (init, zero_init_last, bn_momentum,
    drop_path_schedule, ...) set away from its default: an EfficientNet would silently ignore it."""
    if name not in NAMES:
        raise UserError(f"unknown EfficientNet {name!r}: expected one of {', '.join(NAMES)}")
    _check_no_resnet_switches(name, resnet_switches)
    return timm.create_model(name, pretrained=False, num_classes=num_classes, drop_rate=drop_rate,
                             drop_path_rate=drop_path_rate)


def _check_no_resnet_switches(name: str, switches: dict) -> None:
    defaults = ArchArgs()
    for key, value in switches.items():
        if not hasattr(defaults, key):
            raise UserError(f"{name}: unknown model argument {key!r}")
        if value != getattr(defaults, key):
            raise UserError(f"{name} is timm's EfficientNet: {key}={value!r} is a ResNet-only switch "
                            f"(model.{key} in a config); leave it at its default {getattr(defaults, key)!r}")
