import logging

import pytest
import timm
import torch
from safetensors.torch import save_file

from rs_transfer.models import create_model
from rs_transfer.models.weights import WeightsError, load_weights, read_state_dict

NAME = "rs26-w0.25"


def _source(num_classes=1000, seed=0):
    torch.manual_seed(seed)
    model = create_model(NAME, num_classes=num_classes, init="timm", zero_init_last=False)
    return model.eval()


def _same_output(a, b, x=None):
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2)) if x is None else x
    with torch.no_grad():
        return torch.equal(a.eval()(x), b.eval()(x))


def test_pth_file_loads_and_reproduces_outputs(tmp_path):
    source = _source()
    torch.save(source.state_dict(), tmp_path / "w.pth")
    assert _same_output(create_model(NAME, weights=tmp_path / "w.pth"), source)


def test_safetensors_file(tmp_path):
    source = _source()
    save_file(source.state_dict(), str(tmp_path / "w.safetensors"))
    assert _same_output(create_model(NAME, weights=str(tmp_path / "w.safetensors")), source)


def test_timm_resnetrs_file_loads_into_zoo_model(tmp_path):
    reference = timm.create_model("resnetrs50")
    torch.save(reference.state_dict(), tmp_path / "resnetrs50.pth")
    ours = create_model("rs50", weights=tmp_path / "resnetrs50.pth")
    assert _same_output(ours, reference, torch.randn(1, 3, 64, 64))


def test_ema_is_preferred_and_module_prefix_stripped(tmp_path):
    plain, ema = _source(seed=0), _source(seed=1)
    checkpoint = {
        "state_dict": {f"module.{k}": v for k, v in plain.state_dict().items()},
        "state_dict_ema": ema.state_dict(),
        "epoch": 3,
        "optimizer": {"state": {}, "param_groups": []},
    }
    torch.save(checkpoint, tmp_path / "timm_train.pth.tar")
    assert _same_output(create_model(NAME, weights=tmp_path / "timm_train.pth.tar"), ema)
    model = create_model(NAME)
    load_weights(model, tmp_path / "timm_train.pth.tar", prefer_ema=False)
    assert _same_output(model, plain)


def test_our_checkpoint_format(tmp_path):
    source = _source()
    torch.save({"model": source.state_dict(), "ema": None, "step": 10}, tmp_path / "ckpt.pt")
    assert _same_output(create_model(NAME, weights=tmp_path / "ckpt.pt"), source)


def test_other_classifier_size_is_dropped_on_purpose(tmp_path, caplog):
    source = _source(num_classes=1000)
    torch.save(source.state_dict(), tmp_path / "w.pth")
    with caplog.at_level(logging.INFO):
        model = create_model(NAME, num_classes=10, weights=tmp_path / "w.pth")
    assert "classifier (1000, 512) dropped" in caplog.text
    assert model.fc.out_features == 10
    assert torch.equal(model.layer4[1].conv3.weight, source.layer4[1].conv3.weight)
    assert model.fc.bias.abs().sum() == 0  # the fresh head of the official init, not the file's


def test_a_file_without_classifier_keeps_the_models_head(tmp_path, caplog):
    source = _source()
    torch.save({k: v for k, v in source.state_dict().items() if not k.startswith("fc.")}, tmp_path / "features.pth")
    with caplog.at_level(logging.INFO):
        model = create_model(NAME, num_classes=10, weights=tmp_path / "features.pth")
    assert "has no classifier" in caplog.text and model.fc.out_features == 10
    assert torch.equal(model.layer4[1].conv3.weight, source.layer4[1].conv3.weight)
    with pytest.raises(WeightsError, match="missing keys: fc.bias, fc.weight"):  # unless the head must fit too
        load_weights(create_model(NAME, num_classes=10), tmp_path / "features.pth", new_classifier=False)


def test_features_only_ignores_the_classifier(tmp_path):
    source = _source()
    torch.save(source.state_dict(), tmp_path / "w.pth")
    backbone = create_model(NAME, features_only=True, weights=tmp_path / "w.pth")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        reference = source.forward_intermediates(x, indices=[1, 2, 3, 4], intermediates_only=True)
        assert all(torch.equal(a, b) for a, b in zip(backbone.eval()(x), reference))


def test_missing_and_unexpected_keys_are_named(tmp_path):
    state = _source().state_dict()
    del state["layer2.0.conv1.weight"]
    state["layer9.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "w.pth")
    with pytest.raises(WeightsError) as error:
        create_model(NAME, weights=tmp_path / "w.pth")
    message = str(error.value)
    assert str(tmp_path / "w.pth") in message
    assert "1 missing keys: layer2.0.conv1.weight" in message and "1 unexpected keys: layer9.weight" in message


def test_shape_conflicts_are_named(tmp_path):
    torch.save(create_model("rs26-w0.5").state_dict(), tmp_path / "wide.pth")
    with pytest.raises(WeightsError, match=r"shape conflicts: conv1\.0\.weight: file \(16, 3, 3, 3\) vs model \(8, 3, 3, 3\)"):
        create_model(NAME, weights=tmp_path / "wide.pth")


def test_wrong_depth_is_named(tmp_path):
    torch.save(create_model("rs50-w0.25").state_dict(), tmp_path / "rs50.pth")
    with pytest.raises(WeightsError, match="unexpected keys: layer1.2"):
        create_model(NAME, weights=tmp_path / "rs50.pth")


def test_missing_corrupt_and_foreign_files(tmp_path):
    with pytest.raises(WeightsError, match="not found: .*nope.pth"):
        read_state_dict(tmp_path / "nope.pth")
    (tmp_path / "corrupt.pth").write_bytes(b"\x00not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read weights file .*corrupt.pth"):
        read_state_dict(tmp_path / "corrupt.pth")
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    with pytest.raises(WeightsError, match="holds a Tensor"):
        read_state_dict(tmp_path / "tensor.pth")
    torch.save({"weights": [1, 2]}, tmp_path / "odd.pth")
    with pytest.raises(WeightsError, match="'weights' is not a tensor"):
        read_state_dict(tmp_path / "odd.pth")


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_checkpoint_never_runs_code(tmp_path, capsys):
    torch.save({"model": _Payload()}, tmp_path / "evil.pth")
    with pytest.raises(WeightsError, match="cannot read weights file"):
        read_state_dict(tmp_path / "evil.pth")
    assert "this must never run" not in capsys.readouterr().out


def test_an_efficientnet_classifier_of_another_size_is_dropped_like_a_resnets(tmp_path):
    source = create_model("efficientnet_b0", num_classes=1000)
    torch.save(source.state_dict(), tmp_path / "b0.pth")
    model = create_model("efficientnet_b0", num_classes=10, weights=tmp_path / "b0.pth")
    assert model.classifier.out_features == 10
    assert torch.equal(model.conv_stem.weight, source.conv_stem.weight)
