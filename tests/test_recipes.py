"""Recipes of issue 13 that need a run: early stopping on minival with the report on val (pretrain), CIFAR-100's
101-class head."""

import json
import logging

import torch

from engine_toy import CONFIGS
from rs_transfer.cli import main
from rs_transfer.config import load_config
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
