"""Run families (rs_transfer/families.py): a new family is one module declaring `TASK` plus one registration line,
and `runs`, `predict` and `evaluate` then know its run folders; and run folders written before the families were
declared (tests/fixtures/old_run, a folder_cls run written by commit e92b169) still list, predict, evaluate and
resume, and a pretraining and a video run of that commit (tests/fixtures/old_pretrain_run, old_video_run) list,
predict and evaluate."""

import json
import shutil
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rs_transfer import families
from rs_transfer.cli import main
from rs_transfer.engine.trainer import train
from rs_transfer.errors import UserError
from rs_transfer.families import Family

OLD_RUN = Path(__file__).parent / "fixtures" / "old_run"

TOY_MODULE = '''
"""A toy run family: engine_toy's MLP on random points (tests/engine_toy.py), a `toy` config section, and a
predictor that reads an image as DIM mean grey levels."""

from dataclasses import dataclass, field

import torch

import engine_toy
from rs_transfer.config import RunConfig, at_least, checked
from rs_transfer.families import TaskDeclaration
from rs_transfer.predictor import Predictor, read_image, write_top5


@dataclass
class ToySection:
    points: int = checked(64, at_least(8))  # training points


@dataclass
class ToyConfig(RunConfig):
    toy: ToySection = field(default_factory=ToySection)  # the section that marks a toy run's config.yaml


def build(config):
    return engine_toy.make_task(n=config.toy.points, seed=config.seed)


def build_model(config):
    return engine_toy.ToyNet()


def predict(model, config, image):
    """uint8 (3, H, W) -> class probabilities (CLASSES,): DIM column means of the grey image as the point."""
    grey = image.float().mean(0).mean(0) / 255
    point = torch.nn.functional.adaptive_avg_pool1d(grey[None, None], engine_toy.DIM)[0]
    return model.net(point)[0].softmax(0)


PREDICTOR = Predictor(read=read_image, predict=predict, write=write_top5,
                      class_names=lambda config: (None, "indices: the toy has no class names"))
TASK = TaskDeclaration(name="toy", family="toy", config=ToyConfig, build=build, build_model=build_model,
                       predictor=PREDICTOR, metric="accuracy")
'''


@pytest.fixture
def toy_task(tmp_path, monkeypatch):
    """The toy family's TASK, registered for this test only."""
    (tmp_path / "toy_run_family.py").write_text(textwrap.dedent(TOY_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(families, "FAMILIES", list(families.FAMILIES))
    monkeypatch.delitem(sys.modules, "toy_run_family", raising=False)
    families.register(Family("toy", ("toy",), "toy_run_family"))  # the one line
    yield families.declaration("toy")
    sys.modules.pop("toy_run_family", None)  # its next test writes it again


def write_images(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(folder / f"img_{i}.png")
    return folder


def test_a_registered_family_trains_lists_predicts_and_evaluates_through_the_cli(toy_task, tmp_path, capsys):
    from rs_transfer.config import load_config

    run = tmp_path / "runs" / "toy"
    config = load_config(toy_task.config, None, [
        "toy.points=64", "train.epochs=2", "train.batch_size=16", "train.amp=none", "train.channels_last=false",
        "train.lr=0.5", "train.weight_decay=0", "data.num_workers=0", "train.device=cpu", f"output_dir={run}"])
    final = train(config, families.build(toy_task, config))
    assert families.family_of_config(config_dict(run)) == ("toy", None)

    capsys.readouterr()
    assert main(["runs", str(tmp_path / "runs")]) == 0
    row = capsys.readouterr().out.splitlines()[1].split()
    assert row[:2] == ["toy", "toy"] and row[3:5] == ["accuracy", f"{final['accuracy']:.4f}"], row

    images = write_images(tmp_path / "images", 3)
    assert main(["predict", "--run", str(run), "--images", str(images), "--out", str(tmp_path / "out")]) == 0
    predicted = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert predicted["family"] == "toy" and len(predicted["predictions"]) == 3
    assert all(len(r["top5"]) == 4 and sum(c["score"] for c in r["top5"]) == pytest.approx(1, abs=1e-5)
               for r in predicted["predictions"])

    assert main(["evaluate", "--run", str(run), "--out", str(tmp_path / "again.json")]) == 0
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["family"] == "toy" and again["primary_metric"] == "accuracy"
    assert again["metrics"]["accuracy"] == pytest.approx(final["accuracy"])

    capsys.readouterr()  # its config says no image size: export asks for one (was an AttributeError on config.task)
    assert main(["export", "--run", str(run), "--format", "torchscript"]) == 2
    assert capsys.readouterr().err.strip() == ("error: toy: its config has no evaluation size (task.image_size, "
                                               "task.crop_size): give the input's height and width with --resolution")


def config_dict(run: Path) -> dict:
    import yaml

    return yaml.safe_load((run / "config.yaml").read_text())


def test_a_family_name_is_registered_once(monkeypatch):
    monkeypatch.setattr(families, "FAMILIES", list(families.FAMILIES))
    with pytest.raises(UserError, match="run family 'video' is already registered"):
        families.register(Family("video", ("clips",), "somewhere"))


@pytest.fixture
def old_run(tmp_path) -> Path:
    """A copy of the fixture (the commands write into run folders): finished/ (no summary.json: the listing falls
    back to final_metrics.json), summarised/ (finished/ with the summary.json that commit wrote), unfinished/."""
    root = tmp_path / "old_run"
    shutil.copytree(OLD_RUN, root, ignore=shutil.ignore_patterns("README.txt"))
    shutil.copytree(root / "finished", root / "summarised")
    (root / "finished" / "summary.json").unlink()
    return root


def test_a_run_folder_written_before_the_families_lists_predicts_evaluates_and_resumes(old_run, capsys):
    expected = json.loads((old_run / "finished" / "final_metrics.json").read_text())
    assert main(["runs", str(old_run)]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[1:]}
    value = f"{expected['top1']:.4f}"
    assert expected["top1"] not in (0.0, 0.5, 1.0)  # a model that learnt something: a value weights decide
    for folder in ("finished", "summarised"):
        assert rows[folder][1:5] == ["transfer/folder_cls", "rs26-w0.0625", "top1", value], rows[folder]
    assert rows["unfinished"][-3:] == ["unfinished", "(step", "4)"], rows["unfinished"]

    out = old_run / "predicted"
    assert main(["predict", "--run", str(old_run / "finished"), "--images", str(old_run / "data" / "val"),
                 "--out", str(out)]) == 0
    records = json.loads((out / "predictions.json").read_text())["predictions"]
    then = json.loads((old_run / "predictions.json").read_text())  # what commit e92b169's predict wrote
    now = {Path(r["input"]).relative_to(old_run / "data" / "val").as_posix(): r["top5"] for r in records}
    assert now.keys() == then.keys()
    for name, top5 in now.items():
        assert [c["class"] for c in top5] == [c for c, _ in then[name]], name
        assert [c["score"] for c in top5] == pytest.approx([s for _, s in then[name]], abs=1e-5), name

    assert main(["evaluate", "--run", str(old_run / "finished"), "--data", str(old_run / "data"),
                 "--out", str(old_run / "again.json")]) == 0
    assert json.loads((old_run / "again.json").read_text())["metrics"] == pytest.approx(expected)

    unfinished = old_run / "unfinished"
    assert main(["finetune", "--task", "folder_cls", "--config", str(unfinished / "config.yaml"), "--resume",
                 f"output_dir={unfinished}", f"data.root={old_run / 'data'}"]) == 0
    assert json.loads((unfinished / "final_metrics.json").read_text()) == pytest.approx(expected)
    resumed = torch.load(unfinished / "weights.pth", weights_only=True)
    finished = torch.load(old_run / "finished" / "weights.pth", weights_only=True)
    assert resumed.keys() == finished.keys() and all(torch.equal(resumed[k], finished[k]) for k in finished)


@pytest.mark.parametrize("family", ["pretrain", "video"])
def test_a_pretrain_or_video_run_written_before_the_families_lists_predicts_and_evaluates(family, tmp_path, capsys):
    """tests/fixtures/old_{pretrain,video}_run (README.txt: written by commit e92b169): today's code lists the run,
    predicts what that commit predicted and evaluates to the metrics it gave."""
    fixture = Path(__file__).parent / "fixtures" / f"old_{family}_run"
    run = tmp_path / "finished"
    shutil.copytree(fixture / "finished", run)  # the commands write into run folders
    expected = json.loads((run / "final_metrics.json").read_text())
    assert main(["runs", str(tmp_path)]) == 0
    row = capsys.readouterr().out.splitlines()[1].split()
    assert row[:5] == ["finished", family, "rs26-w0.0625", "top1", f"{expected['top1']:.4f}"], row

    val = fixture / "data" / "val"
    assert main(["predict", "--run", str(run), "--images", str(val), "--out", str(tmp_path / "out")]) == 0
    records = json.loads((tmp_path / "out" / "predictions.json").read_text())["predictions"]
    now = {Path(r["input"]).relative_to(val).as_posix(): r["top5"] for r in records}
    then = json.loads((fixture / "predictions.json").read_text())
    assert now.keys() == then.keys()
    # by index: a pretraining run names its classes from data.root's folders, which were in /tmp when it ran
    classes = sorted({c for top5 in then.values() for c, _ in top5})  # sorted class folders: ImageFolder's order
    for name, top5 in now.items():
        assert [c["index"] for c in top5] == [classes.index(c) for c, _ in then[name]], name
        assert [c["score"] for c in top5] == pytest.approx([s for _, s in then[name]], abs=1e-5), name

    out = tmp_path / "again.json"
    assert main(["evaluate", "--run", str(run), "--data", str(fixture / "data"), "--out", str(out)]) == 0
    again = json.loads(out.read_text())
    assert again["family"] == family and again["metrics"] == pytest.approx(
        json.loads((fixture / "evaluated.json").read_text()))
