"""Frozen backbone stages and frozen BatchNorm: `model.freeze_stages` and `model.freeze_bn`.

`freeze_stages=N` has detectron2's `MODEL.BACKBONE.FREEZE_AT` meaning (detectron2/modeling/backbone/resnet.py
`ResNet.freeze`): 0 freezes nothing, 1 the stem, 2 the stem and C2 (layer1), ... 5 the whole backbone (torchvision's
`--trainable-backbone-layers` counts the other way: trainable = 5 - N). A frozen stage's parameters get
requires_grad=False, so they are neither in the optimizer nor in DDP's gradient reduction, and its BatchNorm layers
become `FrozenBatchNorm` (statistics and affine fixed, no training mode). `freeze_bn` makes every BatchNorm of the
backbone a `FrozenBatchNorm` (the usual choice for detection at a few images per GPU) while its convolutions train.
The backbone is what engine/task.py's `find_backbone` finds.
"""

import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from rs_transfer.config import ConfigError
from rs_transfer.engine.task import find_backbone


class FrozenBatchNorm(FrozenBatchNorm2d):
    """torchvision's FrozenBatchNorm2d for inputs of any rank (BatchNorm1d/2d/3d: torchvision's reshapes to 4-D
    and has no 3-D twin), keeping BatchNorm's `num_batches_tracked` buffer so that the state dict has BatchNorm's
    keys: a frozen run's weights.pth and final.pt load strictly into the normal network of the same name.
    torchvision drops that key on load (`_load_from_state_dict`); here it is loaded like any buffer."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__(num_features, eps)
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    @classmethod
    def of(cls, bn: nn.modules.batchnorm._BatchNorm) -> "FrozenBatchNorm":
        """A frozen copy of `bn` (values copied; on bn's device). A BN without affine or running statistics keeps
        the identity defaults for what it lacks (weight 1, bias 0; mean 0, var 1)."""
        frozen = cls(bn.num_features, bn.eps).to(device=bn.weight.device if bn.affine else None)
        with torch.no_grad():
            if bn.affine:
                frozen.weight.copy_(bn.weight)
                frozen.bias.copy_(bn.bias)
            if bn.track_running_stats:
                frozen.running_mean.copy_(bn.running_mean)
                frozen.running_var.copy_(bn.running_var)
                frozen.num_batches_tracked.copy_(bn.num_batches_tracked)
        return frozen

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        nn.Module._load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                                        unexpected_keys, error_msgs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.ndim - 2)  # (N, C, ...): channels on dim 1
        scale = self.weight.reshape(shape) * (self.running_var.reshape(shape) + self.eps).rsqrt()
        bias = self.bias.reshape(shape) - self.running_mean.reshape(shape) * scale
        return x * scale + bias


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """`module` with every BatchNorm (1d/2d/3d, SyncBatchNorm) inside it, itself included, replaced by a
    FrozenBatchNorm copy; returns the module to use in its place (a new one when `module` is a BatchNorm)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return FrozenBatchNorm.of(module)
    for name, child in module.named_children():
        frozen = freeze_batchnorm(child)
        if frozen is not child:
            setattr(module, name, frozen)
    return module


def freeze(model: nn.Module, freeze_stages: int, freeze_bn: bool) -> int:
    """Freeze the first `freeze_stages` stages of `model`'s backbone (parameters and BN) and, with `freeze_bn`,
    every BN of the backbone, in place. Call before the optimizer, the EMA copy and DDP are built.

    Returns the number of parameter tensors frozen. Raises ConfigError naming the key when the model has no
    backbone (engine/task.py's rule) and either key asks for one.
    """
    if not freeze_stages and not freeze_bn:
        return 0
    backbone = find_backbone(model)
    if backbone is None:
        key = f"model.freeze_stages={freeze_stages}" if freeze_stages else "model.freeze_bn=true"
        raise ConfigError(f"{key} needs a model with a backbone, and this task's model has none (engine/task.py: a "
                          "module with children layer1..layer4)")
    frozen = 0
    for index, stage in enumerate(backbone.stage_modules()):
        for name, child in stage:
            if index < freeze_stages:
                for param in child.parameters():
                    frozen += param.requires_grad
                    param.requires_grad_(False)
            if index < freeze_stages or freeze_bn:
                setattr(backbone.module, name, freeze_batchnorm(child))
    return frozen


def frozen_state_keys(model: nn.Module) -> set[str]:
    """The state-dict keys of `model` that training never changes: parameters with requires_grad=False and the
    buffers of FrozenBatchNorm layers. The EMA skips them, so they stay bitwise what they were."""
    keys = {name for name, param in model.named_parameters() if not param.requires_grad}
    for path, module in model.named_modules():
        if isinstance(module, FrozenBatchNorm):
            keys.update(f"{path}.{name}" if path else name for name, _ in module.named_buffers(recurse=False))
    return keys
