"""Model families (models/registry.py): a new family is one module plus one registration line, and every command
that builds a network by name (finetune, predict, evaluate, runs) then knows it; names are checked without torch."""

import json
import subprocess
import sys
import textwrap

import pytest

from rs_transfer.cli import main
from rs_transfer.config import packaged_configs
from rs_transfer.errors import UserError
from rs_transfer.models import FAMILIES, ModelFamily, create_model, family_of, register

TOY_MODULE = '''
from torch import nn


def build(name, num_classes=1000, **arch):
    """A conv, a pool and a linear classifier `fc`, as wide as the name says (toynet8: 8 channels)."""
    width = int(name.removeprefix("toynet"))
    net = nn.Sequential(nn.Conv2d(3, width, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    net.fc = nn.Linear(width, num_classes)
    return net
'''


@pytest.fixture
def toy_family(tmp_path, monkeypatch):
    (tmp_path / "toy_family_module.py").write_text(textwrap.dedent(TOY_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr("rs_transfer.models.registry.FAMILIES", list(FAMILIES))
    register(ModelFamily("toy", "ToyNet", "toy_family_module", r"toynet\d+", "toynet<width>"))  # the one line
    return "toynet8"


def test_a_registered_family_is_built_by_name_and_refuses_features_only(toy_family):
    net = create_model(toy_family, num_classes=3)
    assert net.fc.out_features == 3 and net[0].out_channels == 8
    with pytest.raises(UserError, match="features_only .* ToyNet family"):
        create_model(toy_family, num_classes=3, features_only=True)


def test_a_registered_family_fine_tunes_predicts_evaluates_and_lists_through_the_cli(toy_family, tmp_path, capsys):
    run = tmp_path / "runs" / "toy"
    demo = packaged_configs() / "downstream" / "folder_cls_demo.yaml"
    assert main(["finetune", "--task", "folder_cls", "--config", str(demo), "--backbone", toy_family, "--synthetic",
                 f"data.root={tmp_path / 'data'}", "data.synthetic_images=16", "train.steps=2", "train.warmup_steps=0", "train.batch_size=4",
                 "task.image_size=32", "task.eval_batch_size=8", f"output_dir={run}"]) == 0
    images = next(p for p in (tmp_path / "data" / "val").iterdir() if p.is_dir())
    classes = sum(p.is_dir() for p in (tmp_path / "data" / "train").iterdir())
    assert main(["predict", "--run", str(run), "--images", str(images), "--out", str(tmp_path / "out")]) == 0
    records = json.loads((tmp_path / "out" / "predictions.json").read_text())["predictions"]
    assert len(records) == len(list(images.iterdir())) and all(len(r["top5"]) == min(5, classes) for r in records)
    assert main(["evaluate", "--run", str(run), "--out", str(tmp_path / "again.json")]) == 0
    again = json.loads((tmp_path / "again.json").read_text())
    final = json.loads((run / "final_metrics.json").read_text())
    assert again["metrics"]["top1"] == pytest.approx(final["top1"])
    capsys.readouterr()
    assert main(["runs", str(tmp_path / "runs")]) == 0
    assert toy_family in capsys.readouterr().out


def test_info_measures_a_registered_family(toy_family, capsys):
    assert main(["info", toy_family, "--resolution", "16", "--num-classes", "3", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    params = 3 * 8 * 9 + 8 + 8 * 3 + 3  # conv 3->8 3x3, fc 8->3, with biases
    assert info["family"] == "ToyNet" and info["params_m"] == round(params / 1e6, 3) and info["gflops"]["16"] >= 0
    assert info["feature_channels"] is None  # the toy has no `features`


def test_names_are_checked_without_importing_torch():
    code = textwrap.dedent("""
        import sys
        from rs_transfer.errors import UserError
        from rs_transfer.models import family_of
        assert family_of("rs101-w1.5").name == "resnet_rs" and family_of("EfficientNet_B3").name == "efficientnet"
        for bad in ("rs51", "efficientnet_b9", "vgg16"):
            try:
                family_of(bad)
            except UserError as error:
                print(error)
        print(sorted(m for m in ("torch", "timm", "torchvision") if m in sys.modules))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0].startswith("unknown depth 51 in model name 'rs51'")
    assert "efficientnet_b0 ... efficientnet_b7" in out[1] and "rs<depth>" in out[1]
    assert "unknown model name 'vgg16'" in out[2]
    assert out[3] == "[]"
