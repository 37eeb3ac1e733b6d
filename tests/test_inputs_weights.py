"""Checkpoints as other tools save them: timm's train.py (with its argparse args), torch.compile'd models,
integer tensors where the model has floats, and torch's own coloured multi-line refusals; and our own pretrain
checkpoints, whose keys sit under the task wrapper's `net.`."""

import argparse

import pytest
import torch
from safetensors.torch import save_file

from engine_toy import CONFIGS
from rs_transfer.models import create_model
from rs_transfer.models.resnet3d_rs import ResNet3d
from rs_transfer.models.weights import WeightsError, load_weights, read_state_dict
from rs_transfer.pretrain.run import pretrain
from rs_transfer.pretrain.synthetic import make_folder_dataset
from rs_transfer.engine.classification import Classifier

NAME = "rs26-w0.25"


def _model(seed):
    torch.manual_seed(seed)
    return create_model(NAME, num_classes=10, init="timm", zero_init_last=False).eval()


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in b) and a.keys() == b.keys()


def test_timm_train_checkpoint_with_args_loads_its_ema(tmp_path):
    plain, ema = _model(0), _model(1)
    optimizer = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    plain(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    # The dict timm's train.py (CheckpointSaver) writes, `args` being the parsed command line.
    checkpoint = {
        "epoch": 7,
        "arch": "resnet",
        "state_dict": plain.state_dict(),
        "optimizer": optimizer.state_dict(),
        "version": 2,
        "args": argparse.Namespace(model="resnetrs50", lr=0.1, epochs=350, smoothing=0.1, data_dir=None,
                                   input_size=[3, 224, 224], mean=(0.485, 0.456, 0.406)),
        "state_dict_ema": ema.state_dict(),
        "metric": 0.5,
    }
    torch.save(checkpoint, tmp_path / "last.pth.tar")
    assert _same(read_state_dict(tmp_path / "last.pth.tar"), ema.state_dict())
    assert _same(read_state_dict(tmp_path / "last.pth.tar", prefer_ema=False), plain.state_dict())


def test_compiled_model_state_dicts_load(tmp_path):
    source = _model(0)
    compiled = torch.compile(source).state_dict()  # what torch.compile's wrapper saves
    assert all(k.startswith("_orig_mod.") for k in compiled)
    bare = {k.removeprefix("_orig_mod."): v for k, v in compiled.items()}
    # DDP around a compiled model, and a compiled DDP model, nest the two prefixes either way round.
    for name, prefix in (("compiled", "_orig_mod."), ("ddp_compiled", "module._orig_mod."),
                         ("compiled_ddp", "_orig_mod.module.")):
        torch.save({prefix + k: v for k, v in bare.items()}, tmp_path / f"{name}.pth")
        model = load_weights(create_model(NAME, num_classes=10), tmp_path / f"{name}.pth")
        assert _same(model.state_dict(), source.state_dict()), name


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_refused_file_gives_one_clean_line(tmp_path):
    torch.save({"model": _Payload()}, tmp_path / "evil.pth")
    with pytest.raises(WeightsError) as error:
        read_state_dict(tmp_path / "evil.pth")
    message = str(error.value)
    assert message.startswith(f"cannot read weights file {tmp_path / 'evil.pth'}: ")
    assert "Unsupported global" in message
    assert "\x1b" not in message and "\n" not in message


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_integer_tensors_for_float_weights_are_refused(tmp_path, suffix, dtype):
    state = _model(0).state_dict()
    state["layer2.0.conv1.weight"] = torch.ones_like(state["layer2.0.conv1.weight"], dtype=dtype)
    path = tmp_path / f"w{suffix}"
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    model = create_model(NAME, num_classes=10)
    with pytest.raises(WeightsError) as error:
        load_weights(model, path)
    message = str(error.value)
    assert str(path) in message
    assert f"1 dtype conflicts: layer2.0.conv1.weight: file {dtype} vs model torch.float32" in message


def test_half_precision_weights_still_load(tmp_path):
    source = _model(0)
    save_file({k: v.half() if v.is_floating_point() else v for k, v in source.state_dict().items()},
              str(tmp_path / "w.safetensors"))
    model = load_weights(create_model(NAME, num_classes=10), tmp_path / "w.safetensors")
    torch.testing.assert_close(model.layer1[0].conv1.weight, source.layer1[0].conv1.weight.half().float())


def _net3d():
    torch.manual_seed(0)
    return ResNet3d("rs26-w0.125", num_classes=4)


def test_3d_checkpoint_of_a_compiled_classifier_loads(tmp_path):
    source = Classifier(_net3d())
    torch.save({"model": torch.compile(source).state_dict()}, tmp_path / "final.pt")
    net = ResNet3d("rs26-w0.125", num_classes=4)
    load_weights(net, str(tmp_path / "final.pt"), new_classifier=False)
    assert _same(net.state_dict(), source.net.state_dict())


def test_3d_checkpoint_with_integer_weights_is_refused(tmp_path):
    state = {f"net.{k}": v for k, v in _net3d().state_dict().items()}
    state["net.fc.weight"] = state["net.fc.weight"].to(torch.int32)
    save_file(state, str(tmp_path / "final.safetensors"))
    with pytest.raises(WeightsError, match=r"dtype conflicts: fc\.weight: file torch\.int32 vs model torch\.float32"):
        load_weights(ResNet3d("rs26-w0.125", num_classes=4), str(tmp_path / "final.safetensors"), new_classifier=False)


def test_a_teacher_from_a_compiled_pretrain_run_loads_and_integer_weights_are_refused(tmp_path):
    from rs_transfer.pretrain.pseudo_label import load_teacher

    net = _model(0)
    compiled = {f"net._orig_mod.{k}": v for k, v in net.state_dict().items()}  # Classifier(compile(net))
    torch.save({"model": compiled}, tmp_path / "teacher.pt")
    assert _same(load_teacher(str(tmp_path / "teacher.pt"), NAME).state_dict(), net.state_dict())
    integers = {k: v.long() if k == "conv1.0.weight" else v for k, v in net.state_dict().items()}
    torch.save(integers, tmp_path / "integers.pth")
    with pytest.raises(WeightsError, match=r"does not fit model 'rs26-w0.25' \(give --model .*\): 1 dtype conflicts: "
                                           r"conv1.0.weight: file torch.int64 vs model torch.float32$"):
        load_teacher(str(tmp_path / "integers.pth"), NAME)


@pytest.fixture(scope="module")
def pretrain_run(tmp_path_factory):
    """A real one-epoch `pretrain` run of the demo config: its final.pt and checkpoints/best.pt."""

    root = make_folder_dataset(tmp_path_factory.mktemp("images"), num_classes=4, train_per_class=8, val_per_class=2)
    out = tmp_path_factory.mktemp("run")
    pretrain(str(CONFIGS / "pretrain/demo.yaml"),
             [f"model.name={NAME}", "data.image_size=32", "train.epochs=1", "train.batch_size=32",
              "data.num_workers=0", f"data.root={root}", f"output_dir={out}"])
    return out


@pytest.mark.parametrize("checkpoint", ["final.pt", "checkpoints/best.pt"])
def test_our_pretrain_checkpoints_load_for_fine_tuning(pretrain_run, checkpoint):
    path = pretrain_run / checkpoint
    saved = torch.load(path, weights_only=True)["model"]
    assert all(k.startswith("net.") for k in saved)  # the Classifier wrapper's names
    network = {k.removeprefix("net."): v for k, v in saved.items()}
    # Same classes: every key loads strictly. CIFAR-100 fine-tuning: the 4-class head is dropped, the rest loads.
    same = create_model(NAME, num_classes=4, weights=str(path))
    assert _same(same.state_dict(), network)
    finetune = create_model(NAME, num_classes=100, weights=str(path))
    assert all(torch.equal(v, network[k]) for k, v in finetune.state_dict().items() if not k.startswith("fc."))
    assert finetune.fc.out_features == 100


def test_net_prefix_is_stripped_around_wrapper_prefixes_and_only_when_every_key_has_it(tmp_path):
    state = _model(0).state_dict()
    for prefix in ("net.", "net._orig_mod.", "module.net.", "_orig_mod.net.module."):
        torch.save({"model": {prefix + k: v for k, v in state.items()}}, tmp_path / "ours.pt")
        assert _same(read_state_dict(tmp_path / "ours.pt"), state), prefix
    # A network that merely has a module called `net` keeps its names.
    mixed = {"net.weight": torch.zeros(2), "head.weight": torch.zeros(2)}
    torch.save(mixed, tmp_path / "mixed.pth")
    assert read_state_dict(tmp_path / "mixed.pth").keys() == mixed.keys()


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
    import tempfile

    from rs_transfer.downstream import finetune

    def no_temp(*args, **kwargs):
        raise AssertionError("demo made a temporary folder it does not use")

    monkeypatch.setattr(tempfile, "mkdtemp", no_temp)
    monkeypatch.setattr(finetune, "run", lambda config, synthetic: {"top1": 0.5})
    assert finetune.demo("cifar100", tmp_path / "data", tmp_path / "run") == {"top1": 0.5}
