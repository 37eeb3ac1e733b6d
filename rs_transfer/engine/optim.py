"""The optimizer (timm's factory), its parameter groups, the linear LR scaling rule and the LR schedule.

The optimizer is `timm.optim.create_optimizer_v2(groups, train.optimizer, ...)`: `sgd` is PyTorch's SGD with
Nesterov momentum, as before this file used timm (the same groups in the same order, so the same run bitwise and
old checkpoints resume); `adamw` (PyTorch's), `lamb` and `lars` (timm's). The groups are ours, not timm's
`param_groups_weight_decay` / `param_groups_layer_decay`: timm puts the undecayed group first and makes one group of
everything when weight_decay is 0 (an old checkpoint's optimizer state would no longer map onto the groups), and
its layer decay needs the model's `group_matcher`, which our task wrappers do not have (its fallback groups
parameters twelve at a time, not by stage). The layer-decay rule is timm's (BEiT's): scale = layer_decay^(last - k)
over the backbone's stages (engine/task.py's `find_backbone`: stem 0, C2..C5 1..4, heads 5), i.e. timm's ResNet
`group_matcher(coarse=True)` grouping. Each group's scale is baked into its `lr` (timm puts it into `lr_scale`,
which only timm's schedulers apply): our LambdaLR multiplies each group's initial LR by the schedule's factor, so
the scales hold at every step and resume exactly.

The schedule is a pure function of the optimizer step, so a resumed run gets the same LR as an uninterrupted
one without replaying anything. Step t (0-based, the t-th update) gets

    peak x min(1, (t + 1) / W) x decay(t)
    decay(t) = 0.5 (1 + cos(pi (t - W) / (T - W)))   "cosine", for t >= W; 1 during warmup
    decay(t) = decay_rate ** (number of boundaries <= t)   "step"

with W warmup steps and T total steps: the warmup reaches the peak on its last step (the official code starts at
0 and reaches the peak one step later; one step of difference), and cosine ends just above 0 on the last step.
"""

import logging
import math

import torch
from timm.optim import create_optimizer_v2
from torch import nn

from rs_transfer.config import MOMENTUM_OPTIMIZERS, ConfigError, TrainConfig
from rs_transfer.engine.task import find_backbone

log = logging.getLogger(__name__)

SCHEDULES = ("cosine", "step")


def peak_lr(train: TrainConfig) -> float:
    return train.lr * train.batch_size / 256 if train.scale_lr else train.lr


def lr_scales(model: nn.Module, train: TrainConfig) -> dict[int, float]:
    """{id(parameter): LR multiplier} for the backbone's parameters when train.backbone_lr_mult or
    train.layer_decay ask for one (empty otherwise): backbone_lr_mult x layer_decay^(5 - stage), stage 0 the stem,
    1..4 C2..C5, the heads (scale 1, not listed) being layer 5. Raises ConfigError naming the key when the model has
    no backbone (engine/task.py's rule)."""
    if train.backbone_lr_mult == 1 and train.layer_decay is None:
        return {}
    backbone = find_backbone(model)
    if backbone is None:
        key = "train.layer_decay" if train.layer_decay is not None else "train.backbone_lr_mult"
        raise ConfigError(f"{key} needs a model with a backbone, and this task's model has none (engine/task.py: a "
                          "module with children layer1..layer4)")
    stages = backbone.stage_modules()
    scales = {}
    for index, stage in enumerate(stages):
        scale = train.backbone_lr_mult * (train.layer_decay ** (len(stages) - index) if train.layer_decay else 1.0)
        for _, child in stage:
            scales.update((id(param), scale) for param in child.parameters())
    return scales


def param_groups(model: nn.Module, weight_decay: float, decay_norm_bias: bool, scales=None, lr: float = 0.0):
    """Parameter groups: per LR scale (`scales`: {id(param): scale}, 1 for a parameter not in it; largest scale
    first), decayed weights, then (unless decay_norm_bias) the undecayed 1-D tensors: norm scales/shifts, biases.
    A group whose scale is not 1 gets `lr` x scale as its "lr" (and its scale as "lr_mult", for the log). Without
    scales this is the two groups [decayed, undecayed] (the second only when there is one) that runs and
    checkpoints had before the optimizer went through timm's factory. Parameters without gradients are left out.

    The official TF code decays every non-BN variable, biases included; biases are a tiny fraction of the
    weights and most PyTorch recipes (timm, torchvision) skip them, so 1-D is the rule here.
    """
    scales = scales or {}
    by_scale: dict[float, tuple[list, list]] = {}
    for param in model.parameters():
        if not param.requires_grad:
            continue
        decay, no_decay = by_scale.setdefault(scales.get(id(param), 1.0), ([], []))
        (no_decay if param.ndim <= 1 and not decay_norm_bias else decay).append(param)
    by_scale.setdefault(1.0, ([], []))  # the decayed group at scale 1 exists even when empty, as it always did
    groups = []
    for scale in sorted(by_scale, reverse=True):
        extra = {} if scale == 1.0 else {"lr": lr * scale, "lr_mult": scale}
        decay, no_decay = by_scale[scale]
        if decay or scale == 1.0:
            groups.append({"params": decay, "weight_decay": weight_decay, **extra})
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0, **extra})
    return groups


def build_optimizer(model: nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
    """train.optimizer from timm's factory over `param_groups`, at the peak LR (the schedule scales it per step).

    momentum and nesterov go to sgd and lars (config.optimizer_settings refuses them for the others); adamw and
    lamb use timm's defaults (betas (0.9, 0.999), eps 1e-8 / 1e-6; lamb also clips the gradient norm at 1).
    """
    peak = peak_lr(train)
    groups = param_groups(model, train.weight_decay, train.weight_decay_norm_bias, lr_scales(model, train), peak)
    extra = {"momentum": train.momentum, "nesterov": train.nesterov} if train.optimizer in MOMENTUM_OPTIMIZERS else {}
    return create_optimizer_v2(groups, opt=train.optimizer, lr=peak, **extra)


def base_lr(optimizer: torch.optim.Optimizer) -> float:
    """The LR of now at scale 1 (peak x the schedule's factor; the heads' LR), the one the log shows: the first
    group without an "lr_mult" (`param_groups` always makes one)."""
    return next(group["lr"] for group in optimizer.param_groups if "lr_mult" not in group)


def describe(optimizer: torch.optim.Optimizer, name: str, frozen: int = 0) -> str:
    """One line for the log: the optimizer and, per group, its tensor count, peak LR (and multiplier) and weight
    decay. Call it before the scheduler scales the LRs."""
    parts = [f"{len(group['params'])} tensors lr {group['lr']:g} (x{group.get('lr_mult', 1.0):g}) "
             f"wd {group['weight_decay']:g}" for group in optimizer.param_groups]
    text = f"optimizer {name} (peak lr {optimizer.defaults['lr']:g}): {len(parts)} groups: {'; '.join(parts)}"
    return text + (f"; {frozen} parameter tensors frozen" if frozen else "")


def warmup_steps(train: TrainConfig, steps_per_epoch: int) -> int:
    if train.warmup_epochs and train.warmup_steps:
        raise ConfigError("give train.warmup_epochs or train.warmup_steps, not both")
    return train.warmup_steps or round(train.warmup_epochs * steps_per_epoch)


def decay_boundaries(train: TrainConfig, steps_per_epoch: int) -> list[int]:
    if train.decay_epochs and train.decay_steps:
        raise ConfigError("give train.decay_epochs or train.decay_steps, not both")
    return sorted(list(train.decay_steps) or [round(e * steps_per_epoch) for e in train.decay_epochs])


def lr_factor(step: int, total: int, warmup: int, schedule: str, boundaries=(), decay_rate: float = 0.1) -> float:
    """The multiplier of the peak LR at 0-based optimizer step `step` of `total` (see the module docstring)."""
    factor = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    if schedule == "cosine":
        if step >= warmup:
            factor *= 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    elif schedule == "step":
        factor *= decay_rate ** sum(step >= b for b in boundaries)
    else:
        raise ConfigError(f"train.schedule must be one of {', '.join(SCHEDULES)}, not {schedule!r}")
    return factor


def build_scheduler(optimizer, train: TrainConfig, total_steps: int, steps_per_epoch: int):
    """A LambdaLR stepped once per optimizer step; its state (the step count) goes into checkpoints."""
    warmup = warmup_steps(train, steps_per_epoch)
    if warmup > total_steps:  # a short smoke run of a long config; worth a word, not a refusal
        log.warning("the warmup (%d steps) is longer than the run (%d steps): the LR never reaches its peak",
                    warmup, total_steps)
    boundaries = decay_boundaries(train, steps_per_epoch)
    if train.schedule not in SCHEDULES:
        raise ConfigError(f"train.schedule must be one of {', '.join(SCHEDULES)}, not {train.schedule!r}")
    if train.schedule == "cosine" and boundaries:
        raise ConfigError("train.decay_epochs/decay_steps apply to train.schedule=step, not cosine")

    def factor(step: int) -> float:
        return lr_factor(step, total_steps, warmup, train.schedule, boundaries, train.decay_rate)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
