"""LR schedule, LR scaling, weight-decay groups and EMA against hand-computed values."""

import math

import pytest
import torch
from torch import nn

from rs_transfer.config import ConfigError, TrainConfig
from rs_transfer.engine.ema import Ema, ema_decay_at
from rs_transfer.engine.optim import build_optimizer, build_scheduler, lr_factor, param_groups, peak_lr


def test_warmup_then_cosine_to_zero():
    # 10 steps, 2 of warmup: 0.5, 1, then 0.5 (1 + cos(pi k / 8)) for k = 0..7.
    expected = [0.5, 1.0, 1.0, 0.9619397663, 0.8535533906, 0.6913417162, 0.5, 0.3086582838, 0.1464466094,
                0.0380602337]
    got = [lr_factor(t, total=10, warmup=2, schedule="cosine") for t in range(10)]
    assert got == pytest.approx(expected, abs=1e-9)


def test_step_decay_with_warmup():
    got = [lr_factor(t, total=10, warmup=2, schedule="step", boundaries=[4, 7], decay_rate=0.1) for t in range(10)]
    assert got == pytest.approx([0.5, 1, 1, 1, 0.1, 0.1, 0.1, 0.01, 0.01, 0.01])


def test_scheduler_drives_the_optimizer_from_the_scaled_peak():
    # Peak = 0.1 x 1024 / 256 = 0.4; warmup 0.5 epoch of 4 steps = 2 steps; step decay at epoch 1 (step 4).
    config = TrainConfig(epochs=2, batch_size=1024, lr=0.1, schedule="step", warmup_epochs=0.5, decay_epochs=[1.0])
    assert peak_lr(config) == pytest.approx(0.4)
    assert peak_lr(TrainConfig(batch_size=1024, lr=0.1, scale_lr=False)) == 0.1
    model = nn.Linear(2, 2)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, total_steps=8, steps_per_epoch=4)
    lrs = []
    for _ in range(8):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.2, 0.4, 0.4, 0.4, 0.04, 0.04, 0.04, 0.04])
    assert all(group["momentum"] == 0.9 and group["nesterov"] for group in optimizer.param_groups)


def test_schedule_config_errors_name_the_key():
    optimizer = build_optimizer(nn.Linear(2, 2), TrainConfig())
    with pytest.raises(ConfigError, match="train.schedule"):
        build_scheduler(optimizer, TrainConfig(schedule="linear"), 10, 5)
    with pytest.raises(ConfigError, match="warmup_epochs or train.warmup_steps"):
        build_scheduler(optimizer, TrainConfig(warmup_epochs=1, warmup_steps=3), 10, 5)
    with pytest.raises(ConfigError, match="schedule=step"):
        build_scheduler(optimizer, TrainConfig(decay_epochs=[3]), 10, 5)


def test_no_weight_decay_on_norm_and_bias_when_configured():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    frozen = nn.Linear(2, 2)
    frozen.requires_grad_(False)
    model.append(frozen)
    decay, no_decay = param_groups(model, weight_decay=4e-5, decay_norm_bias=False)
    assert decay["weight_decay"] == 4e-5 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert [names[id(p)] for p in decay["params"]] == ["0.weight", "3.weight"]
    assert [names[id(p)] for p in no_decay["params"]] == ["1.weight", "1.bias", "3.bias"]
    (everything,) = param_groups(model, weight_decay=4e-5, decay_norm_bias=True)
    assert len(everything["params"]) == 5  # the frozen layer is left out


def test_official_ema_decay_warmup():
    assert ema_decay_at(1, 0.9999, warmup=True) == pytest.approx(2 / 11)
    assert ema_decay_at(100, 0.9999, warmup=True) == pytest.approx(101 / 110)
    assert ema_decay_at(10**6, 0.9999, warmup=True) == 0.9999  # (1 + t) / (10 + t) passes 0.9999 at t = 89991
    assert ema_decay_at(1, 0.9999, warmup=False) == 0.9999


def test_ema_averages_weights_and_bn_buffers():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    ema = Ema(model, decay=0.9, warmup=True)
    start_weight = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    model.train()
    model(torch.randn(8, 3) + 5.0)  # moves the BN running statistics
    ema.update(model, step=1)  # decay min(0.9, 2 / 11) = 2 / 11
    d = 2 / 11
    torch.testing.assert_close(ema.module[0].weight, d * start_weight + (1 - d) * model[0].weight)
    torch.testing.assert_close(ema.module[1].running_mean, (1 - d) * model[1].running_mean)
    torch.testing.assert_close(ema.module[1].running_var, d * torch.ones(3) + (1 - d) * model[1].running_var)
    assert ema.module[1].num_batches_tracked == 1  # integer buffers are copied
    ema.update(model, step=10**6)
    assert math.isclose(ema.get_decay(10**6), 0.9)


def test_table1_baseline_style_step_schedule_from_overrides():
    from rs_transfer.config import RunConfig, load_config

    # 90 epochs, x0.1 at 30, 60 and 80, 5 warmup epochs; 10 steps per epoch here.
    config = load_config(RunConfig, None, ["train.epochs=90", "train.schedule=step", "train.warmup_epochs=5",
                                           "train.decay_epochs=[30,60,80]", "train.batch_size=512"])
    optimizer = build_optimizer(nn.Linear(2, 2), config.train)
    scheduler = build_scheduler(optimizer, config.train, total_steps=900, steps_per_epoch=10)
    factors = [scheduler.lr_lambdas[0](t) for t in (0, 49, 299, 300, 599, 600, 800, 899)]
    assert factors == pytest.approx([0.02, 1, 1, 0.1, 0.1, 0.01, 0.001, 0.001])
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 512 / 256 * 0.02)


def test_cached_ema_update_equals_timms_own():
    # Our Ema keeps its tensor lists between steps; the values must be exactly timm's ModelEmaV3 update, BN
    # statistics and the integer num_batches_tracked included.
    from timm.utils import ModelEmaV3

    from rs_transfer.engine.ema import Ema
    from rs_transfer.models import create_model

    torch.manual_seed(0)
    model = create_model("rs26-w0.25", num_classes=10, init="timm")
    ours, timms = Ema(model, 0.9), ModelEmaV3(model, decay=0.9)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        model(torch.randn(4, 3, 32, 32)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        ours.update(model, step=1000)  # past the warmup: decay 0.9, as timm's
        timms.update(model)
    expected = timms.module.state_dict()
    for key, value in ours.module.state_dict().items():
        assert torch.equal(value, expected[key]), key
    assert ours.module.state_dict()["bn1.num_batches_tracked"] == 3
