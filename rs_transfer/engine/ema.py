"""EMA of weights and BN buffers with the official ResNet-RS warmup (PAPER.md section 7).

timm's ModelEmaV3 does the averaging (parameters and floating-point buffers alike, so the BN running statistics
are averaged too, which the RS recipe needs with BN momentum 1.0); only its decay rule is replaced: after the
t-th optimizer step (t = 1, 2, ...) the decay is min(ema_decay, (1 + t) / (10 + t)), TF's
ExponentialMovingAverage with num_updates = global step.
"""

from timm.utils import ModelEmaV3


def ema_decay_at(step: int, decay: float, warmup: bool) -> float:
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


class Ema(ModelEmaV3):
    def __init__(self, model, decay: float, warmup: bool = True):
        super().__init__(model, decay=decay)
        self.warmup = warmup

    def get_decay(self, step=None) -> float:
        return ema_decay_at(step, self.decay, self.warmup)
