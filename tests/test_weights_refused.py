"""What the weight loader refuses (rs_transfer/models/weights.py, hub.py) and how it says so: one clear line that
names the file and the keys, shapes or dtypes that do not fit, for missing, corrupt and foreign files, files
that would run code, integer tensors where the model has floats, weights of another architecture, and timm tags
that are not cached or do not exist; and the CLI refuses a bad backbone or weights before it writes anything.
What loads is in test_weights.py."""

import pytest
import torch
from safetensors.torch import save_file

from rs_transfer.models import create_model, hub
from rs_transfer.models.resnet3d_rs import ResNet3d
from rs_transfer.models.weights import WeightsError, load_weights, read_state_dict
from weight_files import NAME, Payload, hf_cache, seeded_model


def test_missing_and_unexpected_keys_are_named(tmp_path):
    state = seeded_model().state_dict()
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


def test_checkpoint_never_runs_code(tmp_path, capsys):
    torch.save({"model": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(WeightsError, match="cannot read weights file"):
        read_state_dict(tmp_path / "evil.pth")
    assert "this must never run" not in capsys.readouterr().out


def test_refused_file_gives_one_clean_line(tmp_path):
    torch.save({"model": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(WeightsError) as error:
        read_state_dict(tmp_path / "evil.pth")
    message = str(error.value)
    assert message.startswith(f"cannot read weights file {tmp_path / 'evil.pth'}: ")
    assert "Unsupported global" in message
    assert "\x1b" not in message and "\n" not in message


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_integer_tensors_for_float_weights_are_refused(tmp_path, suffix, dtype):
    state = seeded_model(0, num_classes=10).state_dict()
    state["layer2.0.conv1.weight"] = torch.ones_like(state["layer2.0.conv1.weight"], dtype=dtype)
    path = tmp_path / f"w{suffix}"
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    model = create_model(NAME, num_classes=10)
    with pytest.raises(WeightsError) as error:
        load_weights(model, path)
    message = str(error.value)
    assert str(path) in message
    assert f"1 dtype conflicts: layer2.0.conv1.weight: file {dtype} vs model torch.float32" in message


def test_3d_checkpoint_with_integer_weights_is_refused(tmp_path):
    torch.manual_seed(0)
    state = {f"net.{k}": v for k, v in ResNet3d("rs26-w0.125", num_classes=4).state_dict().items()}
    state["net.fc.weight"] = state["net.fc.weight"].to(torch.int32)
    save_file(state, str(tmp_path / "final.safetensors"))
    with pytest.raises(WeightsError, match=r"dtype conflicts: fc\.weight: file torch\.int32 vs model torch\.float32"):
        load_weights(ResNet3d("rs26-w0.125", num_classes=4), str(tmp_path / "final.safetensors"), new_classifier=False)


def test_a_teacher_with_integer_weights_is_refused_naming_the_model(tmp_path):
    from rs_transfer.pretrain.pseudo_label import load_teacher

    net = seeded_model(0, num_classes=10)
    integers = {k: v.long() if k == "conv1.0.weight" else v for k, v in net.state_dict().items()}
    torch.save(integers, tmp_path / "integers.pth")
    with pytest.raises(WeightsError, match=r"does not fit model 'rs26-w0.25' \(give --model .*\): 1 dtype conflicts: "
                                           r"conv1.0.weight: file torch.int64 vs model torch.float32$"):
        load_teacher(str(tmp_path / "integers.pth"), NAME)


def test_a_cache_copied_without_refs_and_with_two_snapshots_asks_for_a_path(tmp_path):
    cached = hf_cache(tmp_path, "timm/resnetrs50.tf_in1k", "model.safetensors", {"w": torch.zeros(1)})
    (cached.parents[2] / "refs" / "main").unlink()  # `cp -r snapshots/` or a tar of the files alone
    second = cached.parents[1] / "fedcba98" / "model.safetensors"
    second.parent.mkdir()
    second.write_bytes(cached.read_bytes())
    with pytest.raises(WeightsError, match=r"has no refs/main for timm/resnetrs50.tf_in1k and 2 snapshots hold its "
                                           r"weights .*: give the path of one"):
        hub.resolve("timm:resnetrs50.tf_in1k", cache_dir=tmp_path)


def test_uncached_unknown_and_bad_tags_are_one_clear_error(tmp_path):
    with pytest.raises(WeightsError, match=r"timm:resnetrs152.tf_in1k: not in the Hugging Face cache .*"
                                           r"timm/resnetrs152.tf_in1k.*create_model\('resnetrs152.tf_in1k', pretrained=True\)"):
        hub.resolve("timm:resnetrs152.tf_in1k", cache_dir=tmp_path)
    with pytest.raises(WeightsError, match="Invalid pretrained tag.*rs-transfer models"):
        hub.resolve("timm:resnetrs152.no_such_tag", cache_dir=tmp_path)
    with pytest.raises(WeightsError, match="timm has no pretrained weights named 'no_such_model'"):
        hub.resolve("timm:no_such_model", cache_dir=tmp_path)


def test_an_empty_timm_name_reaches_resolve_as_a_string(tmp_path):
    # `--weights timm:` became the override model.weights=timm:, which YAML read as a dict {'timm': None}
    from rs_transfer.downstream import finetune

    config = finetune.make_config("cifar100", weights="timm:", overrides=[f"data.root={tmp_path}"])
    assert config.model.weights == "timm:"
    with pytest.raises(WeightsError, match="no weights name after timm:"):
        finetune.check_model(config)
    odd = str(tmp_path / "a:b {c}' d.pth")
    assert finetune.make_config("cifar100", weights=odd).model.weights == odd


@pytest.mark.parametrize("option, message", [
    (["--backbone", "rs999"], "unknown depth 999 in model name 'rs999'"),
    (["--weights", "timm:nonsense"], "timm:nonsense: timm has no pretrained weights named 'nonsense'"),
    (["--weights", "{tmp}/notes.pth"], "cannot read weights file {tmp}/notes.pth: not a PyTorch checkpoint"),
    (["--weights", "{tmp}/missing.pth"], "weights file not found: {tmp}/missing.pth"),
])
def test_a_bad_backbone_or_weights_fails_before_the_synthetic_dataset_is_written(option, message, tmp_path, capsys):
    from rs_transfer.cli import main

    (tmp_path / "notes.pth").write_text("not weights\n")
    args = ["finetune", "--task", "cifar100", "--synthetic", *option, f"output_dir={tmp_path / 'run'}"]
    assert main([arg.format(tmp=tmp_path) for arg in args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message.format(tmp=tmp_path)}") and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_demo_with_data_and_output_given_makes_no_temporary_folder(tmp_path, monkeypatch):
    # Beside the test above: the demo checks model and weights before it writes data; here it must not make a
    # temporary folder it will not use either.
    import tempfile

    from rs_transfer.downstream import finetune

    def no_temp(*args, **kwargs):
        raise AssertionError("demo made a temporary folder it does not use")

    monkeypatch.setattr(tempfile, "mkdtemp", no_temp)
    monkeypatch.setattr(finetune, "run", lambda config, synthetic: {"top1": 0.5})
    assert finetune.demo("cifar100", tmp_path / "data", tmp_path / "run") == {"top1": 0.5}
