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


# Optimizers through timm's factory, LR multipliers, layer decay and frozen stages (engine/optim.py, engine/freeze.py).

def old_build_optimizer(model, train):
    """The optimizer as the engine built it before timm's factory (kept here only, to compare against)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 and not train.weight_decay_norm_bias else decay).append(param)
    groups = [{"params": decay, "weight_decay": train.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return torch.optim.SGD(groups, lr=peak_lr(train), momentum=train.momentum, nesterov=train.nesterov)


def tiny_classifier(classes: int = 4):
    from rs_transfer.engine.classification import Classifier
    from rs_transfer.models import create_model

    torch.manual_seed(0)
    return Classifier(create_model("rs26-w0.25", num_classes=classes))


def image_batch(n: int = 4, size: int = 32, classes: int = 4, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {"image": torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=generator),
            "label": torch.randint(0, classes, (n,), generator=generator)}


def test_sgd_is_todays_run_bitwise_and_resumes_its_checkpoints(tmp_path, monkeypatch):
    # Three toy runs with BN (1-D tensors: two groups) and weight decay: the old hand-built SGD, timm's factory, and
    # the old one for 1 epoch resumed by the new code for the 2nd: the same final weights, bit for bit.
    from engine_toy import make_task, same_weights, toy_config

    from rs_transfer.engine import trainer

    common = ["train.weight_decay=1e-3", "train.schedule=step"]  # evaluates at step 16 in all three runs
    trainer.train(toy_config(tmp_path / "new", *common), make_task(bn=True))
    with monkeypatch.context() as patch:
        patch.setattr(trainer, "build_optimizer", old_build_optimizer)
        trainer.train(toy_config(tmp_path / "old", *common), make_task(bn=True))
        trainer.train(toy_config(tmp_path / "resumed", *common, "train.epochs=1"), make_task(bn=True))
    trainer.train(toy_config(tmp_path / "resumed", *common, "train.resume=auto"), make_task(bn=True))
    same_weights(tmp_path / "old" / "final.pt", tmp_path / "new" / "final.pt")
    same_weights(tmp_path / "old" / "final.pt", tmp_path / "resumed" / "final.pt")
    old = torch.load(tmp_path / "old" / "checkpoints" / "step_00000032.pt", weights_only=True)["optimizer"]
    new = torch.load(tmp_path / "new" / "checkpoints" / "step_00000032.pt", weights_only=True)["optimizer"]
    assert old["param_groups"] == new["param_groups"] and len(new["param_groups"]) == 2


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_backbone_lr_mult_zero_leaves_the_backbone_unchanged(name):
    model = tiny_classifier()
    before = {k: v.clone() for k, v in model.named_parameters()}
    train = TrainConfig(optimizer=name, lr=0.5, weight_decay=0.05, backbone_lr_mult=0.0)
    optimizer = build_optimizer(model, train)
    scheduler = build_scheduler(optimizer, train, total_steps=4, steps_per_epoch=4)
    for step in range(2):
        model(image_batch(seed=step))["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    changed = {k for k, v in model.named_parameters() if not torch.equal(v, before[k])}
    assert changed == {"net.fc.weight", "net.fc.bias"}


def test_layer_decay_and_backbone_mult_are_baked_into_group_lrs_and_follow_the_schedule():
    # Stage k of the backbone (stem 0, C2..C5 1..4) gets peak x 0.1 x 0.5^(5 - k); the head gets peak.
    model = tiny_classifier()
    train = TrainConfig(lr=0.2, batch_size=512, layer_decay=0.5, backbone_lr_mult=0.1, warmup_steps=2)
    optimizer = build_optimizer(model, train)
    names = {id(p): n for n, p in model.named_parameters()}
    lr_of = {names[id(p)]: group["lr"] for group in optimizer.param_groups for p in group["params"]}
    peak = 0.4
    for name, expected in [("net.fc.weight", peak), ("net.layer4.0.conv1.weight", peak * 0.1 * 0.5),
                           ("net.layer1.1.bn2.bias", peak * 0.1 * 0.5 ** 4), ("net.bn1.weight", peak * 0.1 * 0.5 ** 5),
                           ("net.conv1.0.weight", peak * 0.1 * 0.5 ** 5)]:
        assert lr_of[name] == pytest.approx(expected), name
    scheduler = build_scheduler(optimizer, train, total_steps=10, steps_per_epoch=5)
    initial = [group["lr"] for group in optimizer.param_groups]
    assert initial == pytest.approx([lr * 0.5 for lr in lr_of_groups(optimizer, "initial_lr")])
    optimizer.step()
    scheduler.step()  # warmup step 2 of 2: every group at its own peak
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx(lr_of_groups(optimizer, "initial_lr"))
    from rs_transfer.engine.optim import base_lr

    assert base_lr(optimizer) == pytest.approx(peak)
    assert len(optimizer.state_dict()["param_groups"]) == 12  # 6 scales x (decayed, undecayed)


def lr_of_groups(optimizer, key: str) -> list:
    return [group[key] for group in optimizer.param_groups]


@pytest.mark.parametrize("name", ["adamw", "lamb", "lars"])
def test_other_optimizers_come_from_timms_factory(name):
    from timm.optim import Lamb, Lars

    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    optimizer = build_optimizer(model, TrainConfig(optimizer=name, weight_decay=0.05))
    assert type(optimizer) is {"adamw": torch.optim.AdamW, "lamb": Lamb, "lars": Lars}[name]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05, 0.0]
    assert ("momentum" in optimizer.defaults) == (name == "lars")
    before = model[0].weight.clone()
    model(torch.randn(8, 4)).sum().backward()
    optimizer.step()
    assert not torch.equal(model[0].weight, before)


@pytest.mark.parametrize("override, message", [
    ("train.optimizer=adamww", "train.optimizer='adamww' is not an optimizer here: .* did you mean 'adamw'"),
    ("model.freeze_stages=6", "model.freeze_stages=6 makes no sense here: it must be <= 5"),
    ("train.layer_decay=0", "train.layer_decay=0.0 makes no sense here: it must be in \\(0, 1\\]"),
    ("train.layer_decay=1.5", "train.layer_decay=1.5 makes no sense"),
    ("train.backbone_lr_mult=-1", "train.backbone_lr_mult=-1.0 makes no sense here: it must be >= 0"),
])
def test_optimizer_and_freeze_keys_are_checked(override, message):
    from rs_transfer.config import RunConfig, load_config

    with pytest.raises(ConfigError, match=message):
        load_config(RunConfig, None, [override])


def test_momentum_keys_are_refused_where_they_mean_nothing():
    from rs_transfer.config import RunConfig, load_config

    with pytest.raises(ConfigError, match="train.momentum=0.8 applies to train.optimizer=sgd or lars, not 'adamw'"):
        load_config(RunConfig, None, ["train.optimizer=adamw", "train.momentum=0.8"])
    with pytest.raises(ConfigError, match="train.nesterov=True needs train.momentum > 0"):
        load_config(RunConfig, None, ["train.momentum=0"])
    assert load_config(RunConfig, None, ["train.optimizer=adamw", "train.momentum=0.9"]).train.optimizer == "adamw"


def test_backbone_lr_keys_are_refused_when_the_whole_backbone_is_frozen():
    # freeze_stages=5 takes every backbone parameter out of the optimizer: a multiplier on them would be ignored.
    from rs_transfer.config import RunConfig, load_config
    from rs_transfer.video.config import VideoConfig

    for override in ("train.backbone_lr_mult=0.1", "train.layer_decay=0.5"):
        key = override.partition("=")[0]
        for schema in (RunConfig, VideoConfig):  # every family's config is a RunConfig
            with pytest.raises(ConfigError, match=f"{key}=0.[15] has no effect with model.freeze_stages=5"):
                load_config(schema, None, ["model.freeze_stages=5", override])
        assert load_config(RunConfig, None, ["model.freeze_stages=4", override]).model.freeze_stages == 4
    assert load_config(RunConfig, None, ["model.freeze_stages=5", "train.backbone_lr_mult=1"]).train.layer_decay is None


def test_backbone_keys_are_refused_for_a_model_without_one():
    from rs_transfer.engine.freeze import freeze

    with pytest.raises(ConfigError, match="model.freeze_stages=1 needs a model with a backbone"):
        freeze(nn.Linear(2, 2), 1, False)
    with pytest.raises(ConfigError, match="train.layer_decay needs a model with a backbone"):
        build_optimizer(nn.Linear(2, 2), TrainConfig(layer_decay=0.5))


def test_find_backbone_in_every_family():
    from rs_transfer.downstream.fpn import DensePredictor
    from rs_transfer.engine.task import find_backbone
    from rs_transfer.models.resnet3d_rs import create_model_3d

    stages = [["layer1"], ["layer2"], ["layer3"], ["layer4"]]
    found = find_backbone(tiny_classifier())
    assert (found.path, found.stages) == ("net", [["conv1", "bn1", "act1", "maxpool"]] + stages)
    assert find_backbone(DensePredictor("rs26-w0.25", 3)).path == "backbone.body"  # timm's features_only
    video = find_backbone(create_model_3d("rs26-w0.25", num_classes=4))
    assert (video.path, video.stages) == ("", [["conv1", "maxpool", "bn1", "act1"]] + stages)
    assert find_backbone(nn.Sequential(nn.Linear(2, 2))) is None


@pytest.mark.parametrize("bn, shape", [(nn.BatchNorm2d, (2, 3, 4, 4)), (nn.BatchNorm3d, (2, 3, 2, 4, 4))])
def test_frozen_batchnorm_is_eval_batchnorm_with_its_keys(bn, shape):
    from rs_transfer.engine.freeze import FrozenBatchNorm, freeze_batchnorm

    layer = bn(3)
    layer.train()(torch.randn(*shape) * 3 + 1)  # running statistics away from 0 and 1
    with torch.no_grad():
        layer.weight.uniform_(0.5, 2)
    frozen = freeze_batchnorm(layer)
    assert isinstance(frozen, FrozenBatchNorm) and not list(frozen.parameters())
    assert list(frozen.state_dict()) == list(layer.state_dict())  # num_batches_tracked kept: strict loads both ways
    layer.load_state_dict(frozen.state_dict())
    frozen.load_state_dict(layer.state_dict())
    x = torch.randn(*shape)
    torch.testing.assert_close(frozen.train()(x), layer.eval()(x))


class TinyImages(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, index):
        batch = image_batch(n=1, seed=index)
        return {"image": batch["image"][0], "label": batch["label"][0]}


def test_ema_leaves_frozen_tensors_alone():
    from rs_transfer.engine.freeze import freeze_batchnorm

    model = freeze_batchnorm(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Linear(3, 2)))
    model[0].requires_grad_(False)
    ema = Ema(model, decay=0.5, warmup=False)
    weight, mean = model[0].weight.clone(), model[1].running_mean.clone()
    with torch.no_grad():
        for tensor in (model[0].weight, model[1].running_mean, model[2].weight):
            tensor.add_(1.0)  # what training never does to the first two: shows that the EMA does not look
    ema.update(model, step=1)
    assert torch.equal(ema.module[0].weight, weight) and torch.equal(ema.module[1].running_mean, mean)
    torch.testing.assert_close(ema.module[2].weight, model[2].weight - 0.5)


def test_frozen_stages_come_out_of_training_bitwise_unchanged(tmp_path, caplog):
    # freeze_stages=2 (stem + C2) and freeze_bn, with EMA and weight decay: those weights and every backbone BN
    # are bitwise what went in, in final.pt (model and EMA) and weights.pth; weights.pth loads strictly into the
    # plain network; the run's checkpoint resumes.
    from engine_toy import toy_config

    from rs_transfer.engine.freeze import FrozenBatchNorm
    from rs_transfer.engine.task import Task
    from rs_transfer.engine.trainer import train
    from rs_transfer.models import create_model
    from rs_transfer.models.weights import load_weights

    def task():
        model = tiny_classifier()
        return Task(model=model, train_set=TinyImages(), primary_metric="top1",
                    evaluate=lambda m: {"top1": float((m(image_batch()).argmax(1) == image_batch()["label"]).float()
                                                      .mean())})

    overrides = ["train.batch_size=4", "train.lr=0.4", "train.weight_decay=1e-2", "train.ema_decay=0.5",
                 "model.freeze_stages=2", "model.freeze_bn=true", "train.schedule=step"]
    first = task()
    start = {k: v.clone() for k, v in first.model.net.state_dict().items()}
    with caplog.at_level("INFO", logger="rs_transfer.engine.trainer"):
        train(toy_config(tmp_path, "train.epochs=1", *overrides), first)
    assert "optimizer sgd (peak lr 0.00625): 2 groups:" in caplog.text and "41 parameter tensors frozen" in caplog.text
    assert isinstance(first.model.net.layer1[0].bn1, FrozenBatchNorm)
    assert isinstance(first.model.net.layer3[0].bn1, FrozenBatchNorm)  # freeze_bn reaches past the frozen stages
    assert first.model.net.layer3[0].conv1.weight.requires_grad and not first.model.net.layer1[0].conv1.weight.requires_grad
    train(toy_config(tmp_path, "train.epochs=2", "train.resume=auto", *overrides), task())
    final = torch.load(tmp_path / "final.pt", weights_only=True)
    exported = torch.load(tmp_path / "weights.pth", weights_only=True)
    plain = create_model("rs26-w0.25", num_classes=4)
    norms = tuple(f"{name}." for name, m in plain.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    frozen = [k for k in start if k.startswith(("conv1.", "bn1.", "layer1.") + norms)]
    assert {"layer1.0.conv1.weight", "layer2.0.bn1.running_var", "layer3.0.downsample.2.weight"} <= set(frozen)
    for key in frozen:
        for got in (final["model"]["net." + key], final["ema"]["net." + key], exported[key]):
            assert torch.equal(got, start[key]), key
    for key in ("layer2.0.conv1.weight", "layer4.0.conv2.weight", "fc.weight"):
        assert not torch.equal(exported[key], start[key]), key
    load_weights(plain, tmp_path / "weights.pth", new_classifier=False)
