"""Paper recipes that need a run: early stopping on minival with the report on val (pretrain), CIFAR-100's
101-class head."""

import json
import logging

import pytest
import torch

from engine_toy import CONFIGS
from rs_transfer.cli import main
from rs_transfer.config import ConfigError, load_config
from rs_transfer.downstream import cifar100, finetune
from rs_transfer.engine.classification import Classifier
from rs_transfer.models import create_model
from rs_transfer.pretrain.config import PretrainConfig
from rs_transfer.pretrain.synthetic import make_folder_dataset
from rs_transfer.pretrain.task import build_task

DEMO = CONFIGS / "pretrain" / "demo.yaml"


def test_pretrain_early_stopped_on_minival_reports_the_best_checkpoint_on_val(tmp_path, caplog):
    root = make_folder_dataset(tmp_path / "data", num_classes=3, train_per_class=8, val_per_class=4, seed=2)
    out = tmp_path / "run"
    overrides = [f"data.root={root}", "data.num_workers=0", "train.batch_size=6", "train.epochs=3",
                 "data.eval_split=minival", "data.minival_fraction=0.25", "train.report_best=true"]
    with caplog.at_level(logging.INFO):
        assert main(["pretrain", "--config", str(DEMO), f"output_dir={out}", *overrides]) == 0
    assert any("train.report_best" in r.getMessage() for r in caplog.records)
    best = torch.load(out / "checkpoints" / "best.pt", weights_only=True)
    exported = torch.load(out / "weights.pth", weights_only=True)
    assert all(torch.equal(value, best["model"][f"net.{key}"]) for key, value in exported.items())
    # The report is the best (minival) checkpoint evaluated on ROOT/val, the 12 images minival never holds.
    config = load_config(PretrainConfig, DEMO, overrides[:-2] + ["data.eval_split=val", "model.num_classes=3"])
    model = Classifier(create_model("rs26-w0.25", num_classes=3, weights=str(out / "weights.pth")))
    on_val = build_task(config).evaluate(model.eval())
    assert json.loads((out / "final_metrics.json").read_text()) == on_val


def _cifar_config(tmp_path, *overrides):
    return finetune.make_config("cifar100", config_path=CONFIGS / "downstream" / "cifar100_demo.yaml",
                                overrides=[f"output_dir={tmp_path / 'run'}", f"data.root={tmp_path}", *overrides])


class _BackgroundFirst(torch.nn.Module):
    """Eval-mode stand-in for a 101-way classifier: the background scores highest, the true class second."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # evaluators find the device from a parameter

    def forward(self, batch):
        logits = torch.full((len(batch["label"]), 101), -5.0)
        logits[torch.arange(len(logits)), batch["label"]] = 1.0
        logits[:, 100] = 9.0
        return logits


def test_cifar100_background_class_is_the_papers_101_way_head(tmp_path):
    cifar100.write_cifar100(tmp_path, train=20, test=20)
    default = _cifar_config(tmp_path)
    assert default.task.background_class is False  # the default: a 100-way head
    assert cifar100.build(default).model.net.get_classifier().out_features == 100
    with pytest.raises(ConfigError, match="model.num_classes=100, but task cifar100 has 101 outputs"):
        cifar100.build(_cifar_config(tmp_path, "task.background_class=true"))
    paper = _cifar_config(tmp_path, "task.background_class=true", "model.num_classes=101")
    task = cifar100.build(paper)
    assert task.model.net.get_classifier().out_features == 101
    labels = {int(task.train_set[i]["label"]) for i in range(len(task.train_set))}
    assert max(labels) < 100  # class 100, the background, is never a target
    # Top-1 is the argmax over all 101 outputs: predicting the background is a miss, even when the true class is
    # the runner-up; top-5 still counts it.
    assert task.evaluate(_BackgroundFirst().eval()) == {"top1": 0.0, "top5": 1.0}
