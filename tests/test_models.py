import math

import pytest
import timm
import torch
from torch import nn

from rs_transfer.bench.flops import count_gflops
from rs_transfer.errors import UserError
from rs_transfer.models import create_model, parse_name
from rs_transfer.models import zoo
from rs_transfer.models.resnet_rs import (
    LAYOUTS,
    RELEASED,
    SCALING_DEPTHS,
    SCALING_WIDTHS,
    build_resnet,
    count_params,
    count_params_fast,
    scaling_grid_names,
    shapes_only,
    stochastic_depth_rates,
)

# PAPER.md section 1: blocks per stage (c2, c3, c4, c5).
PAPER_LAYOUTS = {
    50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3), 200: (3, 24, 36, 3), 270: (4, 29, 53, 4),
    350: (4, 36, 72, 4), 420: (4, 44, 87, 4), 300: (4, 36, 54, 4), 400: (6, 48, 72, 6),
}
# PAPER.md section 7: exact parameter counts of timm's ports, and RS-50 by width multiplier (millions).
PAPER_PARAMS = {"rs50": 35.69, "rs101": 63.62, "rs152": 86.62, "rs200": 93.21, "rs270": 129.86, "rs350": 163.96,
                "rs420": 191.89}
PAPER_WIDTH_PARAMS = {0.25: 2.63, 0.5: 9.45, 1.0: 35.69, 1.5: 78.71, 2.0: 138.52}
# PAPER.md section 2, Table 7: (model, resolution, GFLOPs).
PAPER_GFLOPS = [("rs50", 160, 4.6), ("rs101", 160, 8.4), ("rs101", 192, 12), ("rs152", 192, 18), ("rs152", 224, 24),
                ("rs152", 256, 31), ("rs200", 256, 40), ("rs270", 256, 54), ("rs350", 256, 69), ("rs350", 320, 107),
                ("rs420", 320, 128)]


def test_layouts_match_paper():
    for depth, layout in PAPER_LAYOUTS.items():
        assert LAYOUTS[depth] == layout
    assert sum(LAYOUTS[26]) * 3 + 2 == 26  # bottleneck depth = 3 convs per block + stem + classifier


@pytest.mark.parametrize("name", RELEASED)
def test_params_match_paper(name):
    assert count_params_fast(name) / 1e6 == pytest.approx(PAPER_PARAMS[name], rel=0.005)
    assert zoo.TIMM_PARAMS_M[name] == PAPER_PARAMS[name]


@pytest.mark.parametrize("width", SCALING_WIDTHS)
def test_width_multiplier_params_match_paper(width):
    assert count_params_fast(f"rs50-w{width:g}") / 1e6 == pytest.approx(PAPER_WIDTH_PARAMS[width], rel=0.005)


def _zero_model(name):
    # FLOPs depend on shapes only: zeroed memory instead of an init (~8 s of random numbers over these models)
    with shapes_only():
        model = build_resnet(parse_name(name))
    model.to_empty(device="cpu")
    for tensor in [*model.parameters(), *model.buffers()]:
        tensor.data.zero_()
    return model


@pytest.mark.parametrize("name", dict.fromkeys(name for name, _, _ in PAPER_GFLOPS))
def test_gflops_match_table7(name):
    model = _zero_model(name)  # built once for all of its Table 7 rows
    for resolution, gflops in [(res, g) for n, res, g in PAPER_GFLOPS if n == name]:
        assert count_gflops(model, resolution) == pytest.approx(gflops, rel=0.03)
        row = [r for r in zoo.table7_rows(name) if r.resolution == resolution]
        assert len(row) == 1 and row[0].gflops == gflops


def test_scaling_grid_builds_with_scaled_widths():
    names = scaling_grid_names()
    assert len(names) == len(SCALING_DEPTHS) * len(SCALING_WIDTHS) == 35
    for name in names:
        spec = parse_name(name)
        with shapes_only():
            model = build_resnet(spec)
        assert [len(stage) for stage in (model.layer1, model.layer2, model.layer3, model.layer4)] == list(spec.layout)
        assert model.num_features == int(512 * spec.width) * 4
        assert model.conv1[0].out_channels == int(32 * spec.width)
        assert model.maxpool[0].out_channels == int(64 * spec.width)


@pytest.mark.parametrize("name,depth,width,se,resnet_d", [
    ("rs50", 50, 1.0, True, True),
    ("RS101-w1.5", 101, 1.5, True, True),
    ("rs26-w0.25", 26, 0.25, True, True),
    ("resnet152", 152, 1.0, False, False),
    ("resnet152-w2", 152, 2.0, False, False),
    ("resnet200-se", 200, 1.0, True, False),
    ("resnet200-d", 200, 1.0, False, True),
    ("resnet200-d-se", 200, 1.0, True, True),
])
def test_name_grammar(name, depth, width, se, resnet_d):
    spec = parse_name(name)
    assert (spec.depth, spec.width, spec.se, spec.resnet_d) == (depth, width, se, resnet_d)


@pytest.mark.parametrize("name,fragment", [
    ("rs51", "unknown depth 51"),
    ("efficientnet_b0", "expected rs<depth>"),
    ("rs50-se", "already have SE"),
    ("rs50-w0", "must be positive"),
    ("rs50-w1.2.3", "bad width multiplier"),
    ("resnet50-se-se", "repeats"),
])
def test_bad_names_raise_user_error(name, fragment):
    with pytest.raises(UserError, match=fragment):
        parse_name(name)


def _randomise_norms(model):
    # Zero-initialised gammas and unit running stats would hide wiring differences; make every BN non-trivial.
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.weight.data = torch.rand(module.weight.shape, generator=generator) + 0.5
            module.running_mean = torch.randn(module.running_mean.shape, generator=generator) * 0.1
            module.running_var = torch.rand(module.running_var.shape, generator=generator) + 0.5


@pytest.mark.parametrize("name", RELEASED)
def test_timm_state_dict_loads_strictly_and_matches(name):
    reference = timm.create_model(f"resnetrs{name[2:]}")
    _randomise_norms(reference)
    with shapes_only():  # no values of our own: all of them come from the load (assign=True takes its tensors)
        ours = create_model(name)
    theirs, mine = reference.state_dict(), ours.state_dict()
    assert list(mine) == list(theirs)
    assert all(mine[k].shape == v.shape for k, v in theirs.items())
    ours.load_state_dict(theirs, strict=True, assign=True)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ours.eval()(x), reference.eval()(x))


def test_vanilla_resnet152_matches_timm():
    reference = timm.create_model("resnet152")
    _randomise_norms(reference)
    with shapes_only():
        ours = create_model("resnet152")
    ours.load_state_dict(reference.state_dict(), strict=True, assign=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(ours.eval()(x), reference.eval()(x))


def test_resnet_d_and_se_are_what_the_paper_describes():
    model = create_model("rs26-w0.25")
    # Deep stem of three 3x3 convs, the first with stride 2; max pool replaced by a stride-2 3x3 conv.
    convs = [m for m in model.conv1 if isinstance(m, nn.Conv2d)]
    assert [c.kernel_size for c in convs] == [(3, 3)] * 3 and [c.stride for c in convs] == [(2, 2), (1, 1), (1, 1)]
    assert isinstance(model.maxpool[0], nn.Conv2d) and model.maxpool[0].stride == (2, 2)
    block = model.layer2[0]
    assert block.conv1.stride == (1, 1) and block.conv2.stride == (2, 2)  # stride on the 3x3
    pool = block.downsample[0]
    assert isinstance(pool, nn.AvgPool2d) and pool.kernel_size == 2 and pool.ceil_mode and not pool.count_include_pad
    # SE squeezes the block output (4f) to f = the bottleneck width, with biases.
    assert block.se.fc1.out_channels == block.conv2.out_channels == block.conv3.out_channels // 4
    assert block.se.fc1.bias is not None
    plain = create_model("resnet26")
    assert isinstance(plain.maxpool, nn.MaxPool2d) and plain.conv1.kernel_size == (7, 7)
    assert plain.layer1[0].se is None or isinstance(plain.layer1[0].se, nn.Identity)


def test_resnet152_w2_widens_the_stem():
    with shapes_only():
        model = build_resnet(parse_name("resnet152-w2"))
    assert model.conv1.out_channels == 128 and model.bn1.num_features == 128
    assert model.layer1[0].conv1.in_channels == 128 and model.layer1[0].downsample[0].in_channels == 128
    assert model.num_features == 4096


@pytest.mark.parametrize("name", ["resnet26-w0.25", "resnet50-w0.5", "resnet26-w2"])
def test_plain_stem_width_multipliers_run(name):
    model = create_model(name, num_classes=10, init="timm")  # the official init takes seconds at width 2
    first = model.layer1[0]
    assert model.conv1.out_channels == first.conv1.in_channels == first.downsample[0].in_channels
    assert first.downsample[0].out_channels == first.conv3.out_channels
    assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_stochastic_depth_schedules():
    assert stochastic_depth_rates((1, 1, 1, 1), 0.1, "stage") == pytest.approx([0.04, 0.06, 0.08, 0.10])
    stage = stochastic_depth_rates((3, 4, 6, 3), 0.1, "stage")
    assert stage[:3] == pytest.approx([0.04] * 3) and stage[-1] == pytest.approx(0.1)
    block = stochastic_depth_rates((3, 4, 6, 3), 0.1, "block")
    assert block[0] == 0 and block[-1] == pytest.approx(0.1) and block[8] == pytest.approx(0.1 * 8 / 15)
    model = create_model("rs26-w0.25", drop_path_rate=0.1)
    assert [model.layer1[0].drop_path.drop_prob, model.layer4[1].drop_path.drop_prob] == pytest.approx([0.04, 0.1])
    assert create_model("rs26-w0.25").layer1[0].drop_path is None
    with pytest.raises(UserError, match="schedule"):
        stochastic_depth_rates((1, 1, 1, 1), 0.1, "linear")


def test_official_init_and_switches():
    torch.manual_seed(0)
    model = create_model("rs50-w0.5", drop_rate=0.25, bn_momentum=1.0)
    conv = model.layer3[0].conv2
    fan_in = conv.in_channels * 9
    assert conv.weight.std().item() == pytest.approx(math.sqrt(1 / fan_in), rel=0.05)
    assert conv.weight.abs().max().item() <= 2 * math.sqrt(1 / fan_in) / 0.8796 + 1e-6  # truncated at 2 sigma
    assert model.fc.weight.std().item() == pytest.approx(0.01, rel=0.05) and model.fc.bias.abs().sum() == 0
    assert model.layer1[0].bn3.weight.abs().sum() == 0  # last BN of each block starts at gamma 0
    assert model.drop_rate == 0.25
    assert all(m.momentum == 1.0 for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    no_zero = create_model("rs26-w0.25", zero_init_last=False, init="timm")
    assert no_zero.layer1[0].bn3.weight.abs().sum() > 0
    with pytest.raises(UserError, match="init"):
        create_model("rs26-w0.25", init="xavier")


def test_features_only_gives_c2_to_c5():
    backbone = create_model("rs26-w0.25", features_only=True)
    assert backbone.feature_info.reduction() == [4, 8, 16, 32]
    assert backbone.feature_info.channels() == [64, 128, 256, 512]
    features = backbone(torch.randn(2, 3, 64, 64))
    assert [tuple(f.shape) for f in features] == [(2, 64, 16, 16), (2, 128, 8, 8), (2, 256, 4, 4), (2, 512, 2, 2)]
    assert backbone.spec.depth == 26
    with shapes_only():  # channels only: the official init of this 240M network took 8 s
        vanilla = create_model("resnet152-w2", features_only=True)
    assert vanilla.feature_info.channels() == [512, 1024, 2048, 4096]


def test_params_of_built_model_equal_fast_count():
    assert count_params(create_model("rs26-w0.25", num_classes=10)) == count_params_fast("rs26-w0.25", num_classes=10)
