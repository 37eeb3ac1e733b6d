"""The 2D ResNet-RS family and its scaling grid, built on timm's `ResNet`.

A model is timm's ResNet plus a handful of arguments, so a timm `resnetrs*` state dict loads strictly into the
same-named model here. What timm does differently from the official TF code (stochastic depth per block, kaiming
init, SE channel rounding) is a constructor argument with the official behaviour as the default.

The name grammar (rs50, rs101-w1.5, resnet152-w2, resnet200-se, ...) and the layout table live in zoo.py, which
needs no torch; they are imported here so `resnet_rs.parse_name`, `resnet_rs.LAYOUTS`, ... keep working.
"""

import math
from contextlib import contextmanager
from functools import lru_cache, partial

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from timm.layers import DropPath
from timm.layers.squeeze_excite import SEModule
from timm.models import FeatureListNet
from timm.models.resnet import Bottleneck, ResNet

from rs_transfer.errors import UserError
from rs_transfer.models.zoo import (  # noqa: F401 (re-exported: the names' home before zoo.py held them)
    FEATURE_STRIDES,
    LAYOUTS,
    RELEASED,
    SCALING_DEPTHS,
    SCALING_RESOLUTIONS,
    SCALING_WIDTHS,
    STAGE_WIDTHS,
    ArchArgs,
    ModelSpec,
    parse_name,
    scaling_grid_names,
)


def stochastic_depth_rates(layout, rate: float, schedule: str = "stage") -> list:
    """Drop-path probability of every block, in order.

    "stage" (official TF code): constant within a stage, rate * (stage + 1) / 5 for stages 1..4.
    "block" (timm): grows linearly from 0 at the first block to `rate` at the last.
    """
    if schedule == "stage":
        return [rate * (stage + 2) / 5 for stage, blocks in enumerate(layout) for _ in range(blocks)]
    if schedule == "block":
        total = sum(layout)
        return [rate * i / max(total - 1, 1) for i in range(total)]
    raise UserError(f"unknown stochastic depth schedule {schedule!r}: expected 'stage' or 'block'")


def init_conv_official(conv: nn.Module) -> None:
    """TF's VarianceScaling(1.0, fan_in, truncated_normal), for 2D and 3D convs (a 3D fan-in includes time).

    A normal cut at 2 sigma, sigma corrected so that the truncated distribution's std is sqrt(1 / fan_in).
    """
    fan_in = conv.in_channels // conv.groups * math.prod(conv.kernel_size)
    sigma = math.sqrt(1.0 / fan_in) / 0.87962566103423978
    nn.init.trunc_normal_(conv.weight, std=sigma, a=-2 * sigma, b=2 * sigma)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def _init_official(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            init_conv_official(module)
    if isinstance(getattr(model, "fc", None), nn.Linear):
        nn.init.normal_(model.fc.weight, std=0.01)
        nn.init.zeros_(model.fc.bias)


def _widen_plain_stem(model: ResNet, width: int, norm_layer) -> None:
    # timm fixes a 7x7 stem at 64 channels; SimCLR's ResNet-152 2x widens it with the rest of the network.
    first = model.layer1[0]
    model.conv1 = nn.Conv2d(model.conv1.in_channels, width, kernel_size=7, stride=2, padding=3, bias=False)
    model.bn1 = norm_layer(width)
    first.conv1 = nn.Conv2d(width, first.conv1.out_channels, kernel_size=1, bias=False)
    out_channels = first.conv3.out_channels
    if first.downsample is None:  # timm saw 64 in == 4 x 16 out (width 0.25) and needed no projection
        first.downsample = nn.Sequential(nn.Conv2d(width, out_channels, 1, bias=False), norm_layer(out_channels))
    else:
        first.downsample[0] = nn.Conv2d(width, out_channels, kernel_size=1, bias=False)
    model.feature_info[0]["num_chs"] = width


def build_resnet(spec: ModelSpec, num_classes: int = 1000, in_chans: int = 3, **arch) -> ResNet:
    """Build the network a `ModelSpec` describes; `arch`: the switches of zoo.ArchArgs (their defaults there,
    shared with the 3D network). Raises UserError for an unknown switch or value."""
    arch = ArchArgs.of(arch)
    m = spec.width
    norm_layer = partial(nn.BatchNorm2d, momentum=arch.bn_momentum, eps=arch.bn_eps)
    block_args = {}
    if spec.se:
        # Official SE: squeeze to a quarter of the block's output (= the bottleneck width), no rounding.
        block_args["attn_layer"] = partial(SEModule, rd_ratio=0.25, rd_divisor=1)
    stem = dict(stem_width=int(32 * m), stem_type="deep", replace_stem_pool=True, avg_down=True) if spec.resnet_d else {}
    model = ResNet(
        block=Bottleneck,
        layers=spec.layout,
        num_classes=num_classes,
        in_chans=in_chans,
        channels=tuple(int(c * m) for c in STAGE_WIDTHS),
        norm_layer=norm_layer,
        drop_rate=arch.drop_rate,
        zero_init_last=arch.zero_init_last,
        block_args=block_args,
        **stem,
    )
    if not spec.resnet_d and int(64 * m) != 64:
        _widen_plain_stem(model, int(64 * m), norm_layer)
    rates = stochastic_depth_rates(spec.layout, arch.drop_path_rate, arch.drop_path_schedule)
    blocks = [block for stage in (model.layer1, model.layer2, model.layer3, model.layer4) for block in stage]
    for block, rate in zip(blocks, rates):
        block.drop_path = DropPath(rate) if rate > 0 else None
    if arch.init == "official":
        _init_official(model)  # leaves BN alone, so timm's zero-init of the last BNs stays
    model.spec = spec
    return model


def build(name: str, num_classes: int = 1000, **arch) -> ResNet:
    """The family's builder (models/registry.py): the zoo network named `name` (models/zoo.py's grammar) with
    `build_resnet`'s switches as `arch`. Raises UserError for a bad name or switch value."""
    return build_resnet(parse_name(name), num_classes=num_classes, **arch)


def features(model: ResNet, out_indices: tuple = (1, 2, 3, 4)) -> FeatureListNet:
    """The feature extractor of a built classifier: timm's `FeatureListNet`, whose forward gives [C2, C3, C4, C5]
    (strides 4, 8, 16, 32 with the default out_indices) and whose `feature_info.channels()` / `.reduction()`
    describe them; state-dict names are the classifier's minus `fc`, so the same checkpoint loads into both."""
    spec = model.spec
    model = FeatureListNet(model, out_indices=out_indices)
    model.spec = spec
    return model


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class _SkipInitialisers(TorchFunctionMode):
    # A meta tensor holds no values, so initialising it changes nothing, but each call still runs torch's
    # reference decompositions (~1 ms for a `normal_`): 10 s of the 35-model scaling grid went there.
    SKIPPED = {
        torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.fill_, torch.Tensor.zero_,
        nn.init.normal_, nn.init.uniform_, nn.init.trunc_normal_, nn.init.constant_, nn.init.ones_, nn.init.zeros_,
        nn.init.kaiming_normal_, nn.init.kaiming_uniform_, nn.init.xavier_normal_, nn.init.xavier_uniform_,
    }

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensor = args[0] if args else kwargs.get("tensor")
        if func in self.SKIPPED and isinstance(tensor, torch.Tensor) and tensor.is_meta:
            return tensor
        return func(*args, **kwargs)


@contextmanager
def shapes_only():
    """Build modules on the meta device without running their initialisers: every parameter, buffer and shape
    is there (count parameters, read channels and layouts), no memory is allocated and no value exists."""
    with torch.device("meta"), _SkipInitialisers():
        yield


@lru_cache(maxsize=None)  # a few ints; `models` and the tests ask for the same names again
def count_params_fast(name: str, num_classes: int = 1000) -> int:
    """Parameter count without allocating memory (the model is built by `shapes_only`)."""
    with shapes_only():
        model = build_resnet(parse_name(name), num_classes=num_classes, init="timm")
    return count_params(model)
