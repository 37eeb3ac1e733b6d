"""EMA of weights and BN buffers with the official ResNet-RS warmup (PAPER.md section 7).

timm's ModelEmaV3 does the averaging (parameters and floating-point buffers alike, so the BN running statistics
are averaged too, which the RS recipe needs with BN momentum 1.0); only its decay rule is replaced: after the
t-th optimizer step (t = 1, 2, ...) the decay is min(ema_decay, (1 + t) / (10 + t)), TF's
ExponentialMovingAverage with num_updates = global step. Frozen tensors (engine/freeze.py: parameters without
gradients, FrozenBatchNorm buffers) are left out of the update: they are the same in both copies and stay so
bitwise, whatever the averaging's round-off would do to d x w + (1 - d) x w.
"""

import torch
from timm.utils import ModelEmaV3

from rs_transfer.engine.freeze import frozen_state_keys


def ema_decay_at(step: int, decay: float, warmup: bool) -> float:
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


class Ema(ModelEmaV3):
    """timm's ModelEmaV3 with the official decay rule, and its tensor lists built once: timm's update calls
    `state_dict()` on both models at every step (Python work that is a few percent of a small CPU step)."""

    def __init__(self, model, decay: float, warmup: bool = True):
        super().__init__(model, decay=decay)
        self.warmup = warmup
        self._pairs = None  # (EMA floats, model floats, EMA others, model others), for one model object

    def get_decay(self, step=None) -> float:
        return ema_decay_at(step, self.decay, self.warmup)

    @torch.no_grad()
    def apply_update_(self, model, decay: float):
        # The tensors of a module are stable objects (load_state_dict copies into them), so the lists stay valid
        # for the model they were built from.
        if self._pairs is None or self._pairs[0] is not model:
            floats, others = ([], []), ([], [])
            frozen = frozen_state_keys(model)
            for (key, ema_v), model_v in zip(self.module.state_dict().items(), model.state_dict().values()):
                if key in frozen:
                    continue
                pair = floats if ema_v.is_floating_point() else others
                pair[0].append(ema_v)
                pair[1].append(model_v)
            self._pairs = (model, floats, others)
        _, (ema_floats, model_floats), (ema_others, model_others) = self._pairs
        self._foreach_lerp_(ema_floats, model_floats, weight=1.0 - decay)
        if ema_others:
            torch._foreach_copy_(ema_others, model_others)
