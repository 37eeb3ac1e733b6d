"""3D ResNet-RS for video (the paper's Table 6) and the CVRL 3D ResNet-50 it starts from.

The 3D network is the 2D zoo model with a time axis: the same name grammar (`rs50`, `resnet50`, `resnet50-se`,
...; depth and width from the 2D zoo's LAYOUTS) and the same module and state-dict names as the timm-based 2D
model (conv1, bn1, maxpool, layer1..4 of blocks with conv1/bn1/conv2/bn2/conv3/bn3/se.fc1/se.fc2/downsample, fc),
so `inflate_2d` copies a 2D checkpoint in with one loop. What differs, after the TF2 Model Garden
(`k400_resnet3drs_50`; PAPER.md section 7):
- ResNet-D means the deep stem here: conv 32 [5,3,3] stride [2,2,2], conv 32 [1,3,3], conv 64 [1,3,3], then a
  [1,3,3] max pool with stride [1,2,2]; 32 frames become 16 and no later layer strides in time. Without ResNet-D
  the stem is CVRL's: conv 64 [5,7,7] stride 2 and a [3,3,3] max pool with stride 2.
- The shortcut of a strided block is a plain strided 1x1x1 conv + BN (`avg_down=True` gives the 2D model's
  average-pool shortcut instead, which makes inflation exact).
- Each bottleneck is [kt,1,1] -> [1,3,3] -> [1,1,1]. kt per block comes from `temporal_kernels`: "rs" = 1 in c2
  and c3, 3 in c4 and c5; "cvrl" = CVRL's 3D ResNet-50 per-block lists, continued in the same pattern for deeper
  layouts.
- Self-gating (S3D-G: x * sigmoid(W mean(x) + b)) optionally in each stage's last block, before SE.
"""

import logging
from dataclasses import dataclass

import torch
from torch import nn
from timm.layers import DropPath

from rs_transfer.errors import UserError
from rs_transfer.models.resnet_rs import init_conv_official, stochastic_depth_rates
from rs_transfer.errors import WeightsError
from rs_transfer.models.zoo import STAGE_WIDTHS, ArchArgs, ModelSpec, parse_name

log = logging.getLogger(__name__)

# CVRL's 3D ResNet-50 (PAPER.md section 7): temporal kernel of each block's first conv, per stage.
CVRL_TEMPORAL_KERNELS_50 = ((3, 3, 3), (3, 1, 3, 1), (3, 1, 3, 1, 3, 1), (1, 3, 1))
RS_STAGE_TEMPORAL_KERNELS = (1, 1, 3, 3)
TEMPORAL_KERNEL_LAYOUTS = ("rs", "cvrl")
INFLATE_MODES = ("mean", "centre")


def temporal_kernel_layout(layout: tuple, kind: str) -> tuple:
    """kt of every block's first conv, one tuple per stage."""
    if kind == "rs":
        return tuple((kt,) * blocks for kt, blocks in zip(RS_STAGE_TEMPORAL_KERNELS, layout))
    if kind == "cvrl":
        # CVRL's 50-layer lists are: c2 all 3; c3 and c4 alternate 3, 1; c5 alternates 1, 3. Deeper layouts
        # continue that pattern (it reproduces the 50-layer lists exactly, which a test checks).
        first = (3, 3, 3, 1)
        alternate = (False, True, True, True)
        return tuple(
            tuple((first[s] if i % 2 == 0 else 4 - first[s]) if alternate[s] else first[s] for i in range(blocks))
            for s, blocks in enumerate(layout)
        )
    raise UserError(f"unknown temporal kernel layout {kind!r}: expected one of {TEMPORAL_KERNEL_LAYOUTS}")


class SqueezeExcite3d(nn.Module):
    # Official SE: squeeze to a quarter of the block's output, 1x1 convs with biases, ReLU then sigmoid. Same
    # names (fc1, fc2) as timm's SEModule in the 2D model.
    def __init__(self, channels: int, rd_channels: int):
        super().__init__()
        self.fc1 = nn.Conv3d(channels, rd_channels, kernel_size=1, bias=True)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv3d(rd_channels, channels, kernel_size=1, bias=True)

    def forward(self, x):
        scale = x.mean((2, 3, 4), keepdim=True)
        return x * self.fc2(self.act(self.fc1(scale))).sigmoid()


class SelfGating3d(nn.Module):
    # S3D-G feature gating: one full-width 1x1x1 conv on the globally pooled features, then a sigmoid gate.
    def __init__(self, channels: int):
        super().__init__()
        self.fc = nn.Conv3d(channels, channels, kernel_size=1, bias=True)

    def forward(self, x):
        return x * self.fc(x.mean((2, 3, 4), keepdim=True)).sigmoid()


class Bottleneck3d(nn.Module):
    expansion = 4

    def __init__(self, in_chs, width, stride, kt, se, self_gating, drop_path, resnet_d, avg_down, norm_layer):
        super().__init__()
        out_chs = width * self.expansion
        self.conv1 = nn.Conv3d(in_chs, width, (kt, 1, 1), padding=(kt // 2, 0, 0), bias=False)
        self.bn1 = norm_layer(width)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv3d(width, width, (1, 3, 3), stride=(1, stride, stride), padding=(0, 1, 1), bias=False)
        self.bn2 = norm_layer(width)
        self.act2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv3d(width, out_chs, 1, bias=False)
        self.bn3 = norm_layer(out_chs)
        self.self_gate = SelfGating3d(out_chs) if self_gating else None
        self.se = SqueezeExcite3d(out_chs, out_chs // 4) if se else None
        self.drop_path = DropPath(drop_path) if drop_path > 0 else None
        self.act3 = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_chs != out_chs:
            self.downsample = _shortcut(in_chs, out_chs, stride, resnet_d, avg_down, norm_layer)

    def zero_init_last(self):
        nn.init.zeros_(self.bn3.weight)

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.bn3(self.conv3(x))
        if self.self_gate is not None:
            x = self.self_gate(x)
        if self.se is not None:
            x = self.se(x)
        if self.drop_path is not None:
            x = self.drop_path(x)
        return self.act3(x + shortcut)


def _shortcut(in_chs, out_chs, stride, resnet_d, avg_down, norm_layer) -> nn.Sequential:
    # Index names follow timm's 2D model: (conv, bn) for the plain ResNet, (pool, conv, bn) for ResNet-D, so a 2D
    # checkpoint's downsample keys land on the same modules. The 3D ResNet-D default strides the 1x1x1 conv and
    # leaves the pool slot empty; `avg_down` puts the 2D average pool there instead.
    if not resnet_d:
        return nn.Sequential(nn.Conv3d(in_chs, out_chs, 1, stride=(1, stride, stride), bias=False), norm_layer(out_chs))
    if avg_down and stride != 1:
        pool = nn.AvgPool3d((1, 2, 2), (1, 2, 2), ceil_mode=True, count_include_pad=False)
        return nn.Sequential(pool, nn.Conv3d(in_chs, out_chs, 1, bias=False), norm_layer(out_chs))
    conv = nn.Conv3d(in_chs, out_chs, 1, stride=(1, stride, stride), bias=False)
    return nn.Sequential(nn.Identity(), conv, norm_layer(out_chs))


@dataclass(frozen=True)
class Video3dSpec:
    spec: ModelSpec  # depth, width, SE and ResNet-D, from the 2D grammar
    temporal_kernels: str
    self_gating: bool
    stem_pool: str  # "max" (3D default) or "conv" (the 2D ResNet-RS stride-2 conv, for exact inflation)
    avg_down: bool


class ResNet3d(nn.Module):
    def __init__(
        self,
        name: str = "rs50",
        num_classes: int = 400,
        in_chans: int = 3,
        temporal_kernels: str = "rs",
        self_gating: bool = False,
        stem_pool: str = "max",
        avg_down: bool = False,
        **arch,
    ):
        """`arch`: the switches of zoo.ArchArgs, the 2D network's (their defaults there). Raises UserError for a bad
        name, switch or value."""
        super().__init__()
        spec = parse_name(name)
        arch = ArchArgs.of(arch)
        if stem_pool not in ("max", "conv"):
            raise UserError(f"unknown stem_pool {stem_pool!r}: expected 'max' or 'conv'")
        if stem_pool == "conv" and not spec.resnet_d:
            raise UserError(f"stem_pool 'conv' needs a ResNet-D model (rs<depth> or -d), not {name!r}")
        self.spec = Video3dSpec(spec, temporal_kernels, self_gating, stem_pool, avg_down and spec.resnet_d)
        kernels = temporal_kernel_layout(spec.layout, temporal_kernels)

        def norm_layer(channels):
            return nn.BatchNorm3d(channels, eps=arch.bn_eps, momentum=arch.bn_momentum)

        m = spec.width
        if spec.resnet_d:
            stem = int(32 * m)
            self.conv1 = nn.Sequential(
                nn.Conv3d(in_chans, stem, (5, 3, 3), stride=2, padding=(2, 1, 1), bias=False),
                norm_layer(stem),
                nn.ReLU(inplace=True),
                nn.Conv3d(stem, stem, (1, 3, 3), padding=(0, 1, 1), bias=False),
                norm_layer(stem),
                nn.ReLU(inplace=True),
                nn.Conv3d(stem, 2 * stem, (1, 3, 3), padding=(0, 1, 1), bias=False),
            )
            stem_out = 2 * stem
            if stem_pool == "conv":
                self.maxpool = nn.Sequential(
                    nn.Conv3d(stem_out, stem_out, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1), bias=False),
                    norm_layer(stem_out),
                    nn.ReLU(inplace=True),
                )
            else:
                self.maxpool = nn.MaxPool3d((1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))
        else:
            # timm keeps the plain stem at 64 channels; the 2D zoo widens it with the width multiplier.
            stem_out = int(64 * m)
            self.conv1 = nn.Conv3d(in_chans, stem_out, (5, 7, 7), stride=2, padding=(2, 3, 3), bias=False)
            self.maxpool = nn.MaxPool3d(3, stride=2, padding=1)
        self.bn1 = norm_layer(stem_out)
        self.act1 = nn.ReLU(inplace=True)

        rates = iter(stochastic_depth_rates(spec.layout, arch.drop_path_rate, arch.drop_path_schedule))
        in_chs = stem_out
        for stage, (blocks, stage_kernels) in enumerate(zip(spec.layout, kernels)):
            width = int(STAGE_WIDTHS[stage] * m)
            layers = []
            for i in range(blocks):
                stride = 2 if stage > 0 and i == 0 else 1
                gate = self_gating and i == blocks - 1
                layers.append(
                    Bottleneck3d(in_chs, width, stride, stage_kernels[i], spec.se, gate, next(rates),
                                 spec.resnet_d, self.spec.avg_down, norm_layer)
                )
                in_chs = width * Bottleneck3d.expansion
            self.add_module(f"layer{stage + 1}", nn.Sequential(*layers))
        self.num_features = in_chs
        self.global_pool = nn.AdaptiveAvgPool3d(1)
        self.drop = nn.Dropout(arch.drop_rate)
        self.fc = nn.Linear(in_chs, num_classes)
        _init(self, arch.init, arch.zero_init_last)

    def forward_features(self, x):
        """x: (batch, channels, time, height, width) -> the c5 feature map."""
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_head(self, x, pre_logits: bool = False):
        x = self.global_pool(x).flatten(1)
        return x if pre_logits else self.fc(self.drop(x))

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def _init(model: nn.Module, init: str, zero_init_last: bool) -> None:
    for module in model.modules():
        if isinstance(module, nn.Conv3d):
            if init == "official":
                init_conv_official(module)
            else:
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm3d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    if init == "official":
        nn.init.normal_(model.fc.weight, std=0.01)
        nn.init.zeros_(model.fc.bias)
    if zero_init_last:
        for module in model.modules():
            if isinstance(module, Bottleneck3d):
                module.zero_init_last()


def create_model_3d(name: str = "rs50", num_classes: int = 400, inflate_from: str | None = None,
                    inflate: str = "mean", **arch_overrides) -> ResNet3d:
    """Build a 3D model by 2D zoo name (`rs50`, `resnet50`, ...; ResNet3d's switches as `arch_overrides`);
    `inflate_from` is a 2D checkpoint file (or `timm:NAME.TAG`) inflated into it by `inflate_2d` (`inflate`: "mean"
    or "centre"). Returns a ResNet3d: uint8-normalised float clips (N, 3, T, H, W) -> logits (N, num_classes).
    Raises UserError for a bad name or mode, WeightsError for a 2D checkpoint that does not fit."""
    model = ResNet3d(name, num_classes=num_classes, **arch_overrides)
    if inflate_from is not None:
        from rs_transfer.models.weights import read_state_dict

        skipped = inflate_2d(model, read_state_dict(inflate_from), mode=inflate)
        log.info("inflated %s into the 3D %s (%s); 2D keys left out: %s", inflate_from, name, inflate,
                 ", ".join(skipped) or "none")
    return model


def inflate_2d(model: ResNet3d, state_dict_2d: dict, mode: str = "mean") -> list:
    """Copy a 2D zoo state dict into the same-named 3D model; returns the 2D keys that were left out.

    A 2D kernel [out, in, kh, kw] becomes [out, in, kt, kh, kw]:
    - "mean" (I3D): the 2D kernel repeated kt times and divided by kt, so a clip that is constant in time gives
      the 2D response wherever a kernel sees no temporal zero padding.
    - "centre": the 2D kernel in the middle tap, zeros elsewhere; every frame then gets exactly the 2D
      response, borders included, and temporal mixing starts from zero.
    The classifier is skipped when its class count differs (Kinetics-400 vs ImageNet-1k), and so are 2D keys
    with no 3D module (the stem pool's conv when the 3D stem uses a max pool). Any 3D key left unfilled, or a
    shape that does not fit, is an error naming it.
    """
    if mode not in INFLATE_MODES:
        raise UserError(f"unknown inflation mode {mode!r}: expected one of {INFLATE_MODES}")
    target = model.state_dict()
    skipped, filled = [], set()
    for key, value in state_dict_2d.items():
        if key not in target:
            skipped.append(key)
            continue
        want = target[key].shape
        if target[key].is_floating_point() and not value.is_floating_point():
            # load_state_dict would cast integer or bool weights into the float parameter without a word
            raise WeightsError(f"cannot inflate {key}: the 2D checkpoint holds {value.dtype}, the model "
                               f"{target[key].dtype}")
        if key.startswith("fc.") and value.shape != want:
            skipped.append(key)
            continue
        if value.dim() == 4 and len(want) == 5 and value.shape == want[:2] + want[3:]:
            kt = want[2]
            if mode == "mean":
                value = value.unsqueeze(2).repeat(1, 1, kt, 1, 1) / kt
            else:
                centre = torch.zeros(want, dtype=value.dtype)
                centre[:, :, kt // 2] = value
                value = centre
        elif value.shape != want:
            raise WeightsError(f"cannot inflate {key}: 2D shape {tuple(value.shape)} does not fit 3D {tuple(want)}")
        target[key] = value
        filled.add(key)
    missing = [k for k in target if k not in filled and not k.startswith("fc.") and "self_gate" not in k]
    if missing:
        raise WeightsError(f"2D checkpoint leaves {len(missing)} 3D weights unset, e.g. {missing[:5]}")
    model.load_state_dict(target)
    return skipped
