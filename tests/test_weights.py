"""The weight loader's contract (rs_transfer/models/weights.py, hub.py): what loads, from which files and
checkpoint layouts (ours, timm's, torch.compile'd, DDP-wrapped, the Hugging Face cache), and what it keeps or
drops. What it refuses, and how it says so, is in test_weights_refused.py."""

import argparse
import logging

import pytest
import timm
import torch
from safetensors.torch import save_file

from engine_toy import CONFIGS
from rs_transfer.engine.classification import Classifier
from rs_transfer.models import create_model, hub
from rs_transfer.models.resnet3d_rs import ResNet3d
from rs_transfer.models.weights import WeightsError, load_weights, read_state_dict
from weight_files import NAME, hf_cache, same_output, same_state, seeded_model


def test_pth_file_loads_and_reproduces_outputs(tmp_path):
    source = seeded_model()
    torch.save(source.state_dict(), tmp_path / "w.pth")
    assert same_output(create_model(NAME, weights=tmp_path / "w.pth"), source)


def test_safetensors_file(tmp_path):
    source = seeded_model()
    save_file(source.state_dict(), str(tmp_path / "w.safetensors"))
    assert same_output(create_model(NAME, weights=str(tmp_path / "w.safetensors")), source)


def test_timm_resnetrs_file_loads_into_zoo_model(tmp_path):
    reference = timm.create_model("resnetrs50")
    torch.save(reference.state_dict(), tmp_path / "resnetrs50.pth")
    ours = create_model("rs50", weights=tmp_path / "resnetrs50.pth")
    assert same_output(ours, reference, torch.randn(1, 3, 64, 64))


def test_ema_is_preferred_and_module_prefix_stripped(tmp_path):
    plain, ema = seeded_model(seed=0), seeded_model(seed=1)
    checkpoint = {
        "state_dict": {f"module.{k}": v for k, v in plain.state_dict().items()},
        "state_dict_ema": ema.state_dict(),
        "epoch": 3,
        "optimizer": {"state": {}, "param_groups": []},
    }
    torch.save(checkpoint, tmp_path / "timm_train.pth.tar")
    assert same_output(create_model(NAME, weights=tmp_path / "timm_train.pth.tar"), ema)
    model = create_model(NAME)
    load_weights(model, tmp_path / "timm_train.pth.tar", prefer_ema=False)
    assert same_output(model, plain)


def test_timm_train_checkpoint_with_args_loads_its_ema(tmp_path):
    plain, ema = seeded_model(0, num_classes=10), seeded_model(1, num_classes=10)
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
    assert same_state(read_state_dict(tmp_path / "last.pth.tar"), ema.state_dict())
    assert same_state(read_state_dict(tmp_path / "last.pth.tar", prefer_ema=False), plain.state_dict())


def test_our_checkpoint_format(tmp_path):
    source = seeded_model()
    torch.save({"model": source.state_dict(), "ema": None, "step": 10}, tmp_path / "ckpt.pt")
    assert same_output(create_model(NAME, weights=tmp_path / "ckpt.pt"), source)


def test_compiled_model_state_dicts_load(tmp_path):
    source = seeded_model(0, num_classes=10)
    compiled = torch.compile(source).state_dict()  # what torch.compile's wrapper saves
    assert all(k.startswith("_orig_mod.") for k in compiled)
    bare = {k.removeprefix("_orig_mod."): v for k, v in compiled.items()}
    # DDP around a compiled model, and a compiled DDP model, nest the two prefixes either way round.
    for name, prefix in (("compiled", "_orig_mod."), ("ddp_compiled", "module._orig_mod."),
                         ("compiled_ddp", "_orig_mod.module.")):
        torch.save({prefix + k: v for k, v in bare.items()}, tmp_path / f"{name}.pth")
        model = load_weights(create_model(NAME, num_classes=10), tmp_path / f"{name}.pth")
        assert same_state(model.state_dict(), source.state_dict()), name


def test_net_prefix_is_stripped_around_wrapper_prefixes_and_only_when_every_key_has_it(tmp_path):
    state = seeded_model(0, num_classes=10).state_dict()
    for prefix in ("net.", "net._orig_mod.", "module.net.", "_orig_mod.net.module."):
        torch.save({"model": {prefix + k: v for k, v in state.items()}}, tmp_path / "ours.pt")
        assert same_state(read_state_dict(tmp_path / "ours.pt"), state), prefix
    # A network that merely has a module called `net` keeps its names.
    mixed = {"net.weight": torch.zeros(2), "head.weight": torch.zeros(2)}
    torch.save(mixed, tmp_path / "mixed.pth")
    assert read_state_dict(tmp_path / "mixed.pth").keys() == mixed.keys()


def test_half_precision_weights_still_load(tmp_path):
    source = seeded_model(0, num_classes=10)
    save_file({k: v.half() if v.is_floating_point() else v for k, v in source.state_dict().items()},
              str(tmp_path / "w.safetensors"))
    model = load_weights(create_model(NAME, num_classes=10), tmp_path / "w.safetensors")
    torch.testing.assert_close(model.layer1[0].conv1.weight, source.layer1[0].conv1.weight.half().float())


def test_other_classifier_size_is_dropped_on_purpose(tmp_path, caplog):
    source = seeded_model(num_classes=1000)
    torch.save(source.state_dict(), tmp_path / "w.pth")
    with caplog.at_level(logging.INFO):
        model = create_model(NAME, num_classes=10, weights=tmp_path / "w.pth")
    assert "classifier (1000, 512) dropped" in caplog.text
    assert model.fc.out_features == 10
    assert torch.equal(model.layer4[1].conv3.weight, source.layer4[1].conv3.weight)
    assert model.fc.bias.abs().sum() == 0  # the fresh head of the official init, not the file's


def test_an_efficientnet_classifier_of_another_size_is_dropped_like_a_resnets(tmp_path):
    source = create_model("efficientnet_b0", num_classes=1000)
    torch.save(source.state_dict(), tmp_path / "b0.pth")
    model = create_model("efficientnet_b0", num_classes=10, weights=tmp_path / "b0.pth")
    assert model.classifier.out_features == 10
    assert torch.equal(model.conv_stem.weight, source.conv_stem.weight)


def test_a_file_without_classifier_keeps_the_models_head(tmp_path, caplog):
    source = seeded_model()
    torch.save({k: v for k, v in source.state_dict().items() if not k.startswith("fc.")}, tmp_path / "features.pth")
    with caplog.at_level(logging.INFO):
        model = create_model(NAME, num_classes=10, weights=tmp_path / "features.pth")
    assert "has no classifier" in caplog.text and model.fc.out_features == 10
    assert torch.equal(model.layer4[1].conv3.weight, source.layer4[1].conv3.weight)
    with pytest.raises(WeightsError, match="missing keys: fc.bias, fc.weight"):  # unless the head must fit too
        load_weights(create_model(NAME, num_classes=10), tmp_path / "features.pth", new_classifier=False)


def test_features_only_ignores_the_classifier(tmp_path):
    source = seeded_model()
    torch.save(source.state_dict(), tmp_path / "w.pth")
    backbone = create_model(NAME, features_only=True, weights=tmp_path / "w.pth")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        reference = source.forward_intermediates(x, indices=[1, 2, 3, 4], intermediates_only=True)
        assert all(torch.equal(a, b) for a, b in zip(backbone.eval()(x), reference))


def test_3d_checkpoint_of_a_compiled_classifier_loads(tmp_path):
    torch.manual_seed(0)
    source = Classifier(ResNet3d("rs26-w0.125", num_classes=4))
    torch.save({"model": torch.compile(source).state_dict()}, tmp_path / "final.pt")
    net = ResNet3d("rs26-w0.125", num_classes=4)
    load_weights(net, str(tmp_path / "final.pt"), new_classifier=False)
    assert same_state(net.state_dict(), source.net.state_dict())


def test_a_teacher_from_a_compiled_pretrain_run_loads(tmp_path):
    from rs_transfer.pretrain.pseudo_label import load_teacher

    net = seeded_model(0, num_classes=10)
    compiled = {f"net._orig_mod.{k}": v for k, v in net.state_dict().items()}  # Classifier(compile(net))
    torch.save({"model": compiled}, tmp_path / "teacher.pt")
    assert same_state(load_teacher(str(tmp_path / "teacher.pt"), NAME).state_dict(), net.state_dict())


@pytest.fixture(scope="module")
def pretrain_run(tmp_path_factory):
    """A real one-epoch `pretrain` run of the demo config: its final.pt and checkpoints/best.pt."""
    from rs_transfer.pretrain.run import pretrain
    from rs_transfer.pretrain.synthetic import make_folder_dataset

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
    assert same_state(same.state_dict(), network)
    finetune = create_model(NAME, num_classes=100, weights=str(path))
    assert all(torch.equal(v, network[k]) for k, v in finetune.state_dict().items() if not k.startswith("fc."))
    assert finetune.fc.out_features == 100


def test_a_timm_tag_resolves_to_the_cached_file(tmp_path):
    state = {"conv1.weight": torch.randn(2, 3, 1, 1)}
    cached = hf_cache(tmp_path, "timm/resnetrs50.tf_in1k", "model.safetensors", state)
    assert hub.resolve("timm:resnetrs50.tf_in1k", cache_dir=tmp_path) == cached
    assert hub.resolve("timm:resnetrs50", cache_dir=tmp_path) == cached  # timm's default tag for the model
    assert hub.resolve(str(cached)) == cached  # a path stays a path


def test_the_pickle_file_is_found_when_there_is_no_safetensors(tmp_path):
    cached = hf_cache(tmp_path, "timm/resnetrs101.tf_in1k", "pytorch_model.bin", {"w": torch.zeros(1)})
    assert hub.resolve("timm:resnetrs101.tf_in1k", cache_dir=tmp_path) == cached


def test_a_cache_copied_without_refs_is_found_by_its_snapshot(tmp_path):
    cached = hf_cache(tmp_path, "timm/resnetrs50.tf_in1k", "model.safetensors", {"w": torch.zeros(1)})
    (cached.parents[2] / "refs" / "main").unlink()  # `cp -r snapshots/` or a tar of the files alone
    assert hub.resolve("timm:resnetrs50.tf_in1k", cache_dir=tmp_path) == cached


def test_loading_by_tag_gives_the_same_model_as_loading_the_file(tmp_path, monkeypatch):
    import huggingface_hub

    source = create_model(NAME, num_classes=10)
    cached = hf_cache(tmp_path, "timm/resnetrs50.tf_in1k", "model.safetensors",
                      {k: v.contiguous() for k, v in source.state_dict().items()})
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    by_path = load_weights(create_model(NAME, num_classes=10), cached, new_classifier=False).eval()
    by_tag = load_weights(create_model(NAME, num_classes=10), "timm:resnetrs50.tf_in1k",
                          new_classifier=False).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(by_tag(images), by_path(images))
        assert torch.equal(by_tag(images), source.eval()(images))
    with pytest.raises(WeightsError, match="timm:resnetrs101.tf_in1k: not in the Hugging Face cache"):
        load_weights(create_model(NAME, num_classes=10), "timm:resnetrs101.tf_in1k")
    # what configs (`model.weights: timm:...`) and `--weights` reach: create_model's weights argument
    built = create_model(NAME, num_classes=10, weights="timm:resnetrs50.tf_in1k").eval()
    with torch.no_grad():
        assert torch.equal(built(images), by_path(images))
