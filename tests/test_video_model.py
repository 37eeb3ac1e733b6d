"""3D ResNet-RS and the CVRL 3D ResNet-50: layouts, shapes, parameter counts (PAPER.md section 7), inflation."""

import pytest
import torch

from rs_transfer.errors import UserError
from rs_transfer.models import create_model
from rs_transfer.models.resnet3d_rs import ResNet3d, inflate_2d
from rs_transfer.models.resnet_rs import count_params, shapes_only

# PAPER.md section 7: CVRL's temporal kernel per block; 3D ResNet-RS: kt 1 in c2 and c3, 3 in c4 and c5.
CVRL_KERNELS = [(3, 3, 3), (3, 1, 3, 1), (3, 1, 3, 1, 3, 1), (1, 3, 1)]
RS_KERNELS = [(1, 1, 1), (1, 1, 1, 1), (3, 3, 3, 3, 3, 3), (3, 3, 3)]


def block_kernels(model):
    return [tuple(b.conv1.kernel_size[0] for b in getattr(model, f"layer{i}")) for i in range(1, 5)]


def meta_model(name, **kwargs):
    with shapes_only():
        return ResNet3d(name, num_classes=400, init="timm", **kwargs)


def test_rs50_3d_layout():
    model = meta_model("rs50")
    assert block_kernels(model) == RS_KERNELS
    stem = [m for m in model.conv1 if isinstance(m, torch.nn.Conv3d)]
    assert [c.kernel_size for c in stem] == [(5, 3, 3), (1, 3, 3), (1, 3, 3)]
    assert [c.stride for c in stem] == [(2, 2, 2), (1, 1, 1), (1, 1, 1)]
    assert [c.out_channels for c in stem] == [32, 32, 64]
    assert model.maxpool.kernel_size == (1, 3, 3) and model.maxpool.stride == (1, 2, 2)
    blocks = [b for i in range(1, 5) for b in getattr(model, f"layer{i}")]
    assert all(b.conv2.kernel_size == (1, 3, 3) and b.conv3.kernel_size == (1, 1, 1) for b in blocks)
    assert all(b.se is not None for b in blocks)
    # Every temporal stride is in the stem: 32 frames become 16 and stay 16.
    assert all(b.conv2.stride[0] == 1 and (b.downsample is None or b.downsample[1].stride[0] == 1) for b in blocks)
    assert [b.drop_path for b in blocks] == [None] * 16  # stochastic depth off by default


def test_cvrl_layout():
    model = meta_model("resnet50", temporal_kernels="cvrl")
    assert block_kernels(model) == CVRL_KERNELS
    assert model.conv1.kernel_size == (5, 7, 7) and model.conv1.stride == (2, 2, 2) and model.conv1.out_channels == 64
    assert model.maxpool.kernel_size == 3 and model.maxpool.stride == 2
    assert all(b.se is None for i in range(1, 5) for b in getattr(model, f"layer{i}"))


def test_deeper_layouts_follow_the_zoo():
    model = meta_model("rs101", temporal_kernels="cvrl")
    assert [len(k) for k in block_kernels(model)] == [3, 4, 23, 3]
    assert block_kernels(model)[2][:6] == CVRL_KERNELS[2]


@pytest.mark.parametrize("name, kernels, params_m", [("rs50", "rs", 48.1), ("resnet50", "cvrl", 33.6)])
def test_param_counts(name, kernels, params_m):
    # PAPER.md: 3D ResNet-RS-50 about 48.1 M, CVRL 3D ResNet-50 about 33.6 M (400 classes). Both figures are
    # reached only with self-gating in each stage's last block (5.57 M of full-width gates with biases); without it the
    # networks have 42.56 M and 28.04 M. Tolerance: the paper's rounding to 0.1 M.
    with_gating = count_params(meta_model(name, temporal_kernels=kernels, self_gating=True)) / 1e6
    assert round(with_gating, 1) == params_m
    without = count_params(meta_model(name, temporal_kernels=kernels)) / 1e6
    assert with_gating - without == pytest.approx(5.574, abs=0.001)


@pytest.mark.parametrize("name, kernels, feature_frames", [("rs26-w0.25", "rs", 4), ("resnet26-w0.25", "cvrl", 2)])
def test_output_shapes(name, kernels, feature_frames):
    model = ResNet3d(name, num_classes=5, temporal_kernels=kernels, self_gating=True, drop_rate=0.5,
                     drop_path_rate=0.1).eval()
    clip = torch.randn(2, 3, 8, 32, 32)
    assert model.forward_features(clip).shape == (2, 512, feature_frames, 1, 1)
    assert model(clip).shape == (2, 5)


def _randomise_bn(model):
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, (torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)):
            n = module.num_features
            module.weight.data = torch.rand(n, generator=generator) + 0.5
            module.bias.data = torch.randn(n, generator=generator) * 0.1
            module.running_mean = torch.randn(n, generator=generator) * 0.1
            module.running_var = torch.rand(n, generator=generator) + 0.5


def test_centre_inflation_reproduces_2d_logits_on_a_static_clip():
    model_2d = create_model("rs26-w0.25", num_classes=7).eval()
    _randomise_bn(model_2d)  # the zero-initialised last BNs would hide the residual branches
    # The 2D stem conv and average-pool shortcuts make every layer a counterpart of a 2D one.
    model_3d = ResNet3d("rs26-w0.25", num_classes=7, stem_pool="conv", avg_down=True).eval()
    assert inflate_2d(model_3d, model_2d.state_dict(), mode="centre") == []
    image = torch.randn(2, 3, 32, 32)
    clip = image.unsqueeze(2).expand(-1, -1, 6, -1, -1)
    with torch.no_grad():
        torch.testing.assert_close(model_3d(clip), model_2d(image), rtol=1e-4, atol=1e-4)


def test_mean_inflation_matches_2d_away_from_temporal_borders():
    model_2d = create_model("rs26-w0.25", num_classes=7).eval()
    model_3d = ResNet3d("rs26-w0.25", num_classes=7).eval()
    skipped = inflate_2d(model_3d, model_2d.state_dict(), mode="mean")
    assert sorted(skipped) == sorted(k for k in model_2d.state_dict() if k.startswith("maxpool."))
    assert model_3d.conv1[0].weight.shape == (8, 3, 5, 3, 3)
    torch.testing.assert_close(model_3d.conv1[0].weight.sum(2), model_2d.conv1[0].weight)
    image = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        out_3d = model_3d.conv1[0](image.unsqueeze(2).expand(-1, -1, 8, -1, -1))
        out_2d = model_2d.conv1[0](image)
    # Output frames 1 and 2 read input frames 0-6, all inside the clip (kernel 5, stride 2, padding 2).
    for t in (1, 2):
        torch.testing.assert_close(out_3d[:, :, t], out_2d, rtol=1e-5, atol=1e-5)


def test_inflation_keeps_3d_head_when_classes_differ_and_rejects_wrong_models():
    model_3d = ResNet3d("rs26-w0.25", num_classes=4)
    head = model_3d.fc.weight.clone()
    skipped = inflate_2d(model_3d, create_model("rs26-w0.25", num_classes=1000).state_dict())
    assert "fc.weight" in skipped and torch.equal(model_3d.fc.weight, head)
    with shapes_only():
        with pytest.raises(UserError, match="cannot inflate layer1.0.downsample.1.weight"):
            inflate_2d(ResNet3d("rs26", init="timm"), create_model("resnet26", init="timm").state_dict())
        partial = create_model("rs26-w0.25", init="timm").state_dict()
        del partial["layer1.0.conv2.weight"]
        with pytest.raises(UserError, match="unset.*layer1.0.conv2.weight"):
            inflate_2d(ResNet3d("rs26-w0.25", init="timm"), partial)
        with pytest.raises(UserError, match="cannot inflate conv1.0.weight"):
            inflate_2d(ResNet3d("rs26-w0.25", init="timm"), create_model("rs26-w0.5", init="timm").state_dict())
    integers = {k: v.long() for k, v in create_model("rs26-w0.25", init="timm").state_dict().items()}
    with pytest.raises(UserError, match="cannot inflate conv1.0.weight: the 2D checkpoint holds torch.int64"):
        inflate_2d(ResNet3d("rs26-w0.25", init="timm"), integers)


def test_bad_switches_are_user_errors():
    with pytest.raises(UserError, match="temporal kernel layout"):
        ResNet3d("rs26", temporal_kernels="slowfast")
    with pytest.raises(UserError, match="needs a ResNet-D"):
        ResNet3d("resnet26", stem_pool="conv")
