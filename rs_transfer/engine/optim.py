"""SGD with momentum, the linear LR scaling rule, weight-decay groups and the LR schedule.

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
from torch import nn

from rs_transfer.config import ConfigError, TrainConfig

log = logging.getLogger(__name__)

SCHEDULES = ("cosine", "step")


def peak_lr(train: TrainConfig) -> float:
    return train.lr * train.batch_size / 256 if train.scale_lr else train.lr


def param_groups(model: nn.Module, weight_decay: float, decay_norm_bias: bool) -> list[dict]:
    """Two groups: decayed weights, and (unless decay_norm_bias) undecayed 1-D tensors: norm scales/shifts, biases.

    The official TF code decays every non-BN variable, biases included; biases are a tiny fraction of the
    weights and most PyTorch recipes (timm, torchvision) skip them, so 1-D is the rule here.
    """
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 and not decay_norm_bias else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, train: TrainConfig) -> torch.optim.SGD:
    groups = param_groups(model, train.weight_decay, train.weight_decay_norm_bias)
    return torch.optim.SGD(groups, lr=peak_lr(train), momentum=train.momentum, nesterov=train.nesterov)


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
