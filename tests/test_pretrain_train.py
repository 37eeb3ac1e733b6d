import json
import logging

import pytest
import torch

from engine_toy import CONFIGS
from forked_ranks import run_ranks
from rs_transfer.cli import main
from rs_transfer.config import load_config
from rs_transfer.models import create_model
from rs_transfer.pretrain import pseudo_label
from rs_transfer.pretrain.config import PretrainConfig
from rs_transfer.pretrain.task import build_task
from rs_transfer.pretrain.synthetic import make_folder_dataset

DEMO = CONFIGS / "pretrain" / "demo.yaml"


def test_demo_learns_a_generated_folder_dataset_and_skips_a_corrupt_image(tmp_path, caplog):
    root = make_folder_dataset(tmp_path / "data", num_classes=4, train_per_class=16, val_per_class=10, seed=1)
    (root / "train" / "class_002" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO):
        code = main(["pretrain", "--config", str(DEMO), f"data.root={root}", f"output_dir={out}", "train.epochs=4",
                     "train.batch_size=16", "data.num_workers=0", "train.eval_every_epochs=0"])
    assert code == 0
    metrics = json.loads((out / "final_metrics.json").read_text())
    assert set(metrics) == {"top1", "top5"} and 0 <= metrics["top1"] <= metrics["top5"] <= 1
    assert metrics["top1"] >= 0.6  # chance is 0.25 on 40 validation images
    messages = [r.getMessage() for r in caplog.records]
    assert any("class_002/corrupt.jpg" in m for m in messages)
    assert any("unreadable training images were skipped" in m for m in messages)
    create_model("rs26-w0.25", num_classes=4, weights=str(out / "weights.pth"))  # strict load of the export
    assert "rs26-w0.25" in (out / "config.yaml").read_text()


def test_cotraining_runs_through_the_engine_with_mixed_batches(tmp_path):
    root = make_folder_dataset(tmp_path / "data", num_classes=3, train_per_class=6, val_per_class=2)
    teacher = tmp_path / "teacher.pth"
    torch.save(create_model("rs26-w0.25", num_classes=3).state_dict(), teacher)
    pseudo_label.label_images(str(teacher), str(root / "val"), str(tmp_path / "pl"), model_name="rs26-w0.25",
                              image_size=32, batch_size=8, topk=2, threshold=0.0, num_workers=0)
    out = tmp_path / "run"
    code = main(["pretrain", "--config", str(DEMO), f"data.root={root}", f"output_dir={out}", "model.num_classes=3",
                 "train.epochs=null", "train.steps=2", "train.batch_size=8", "data.num_workers=0",
                 "cotrain.enabled=true", f"cotrain.pseudo_labels={tmp_path / 'pl'}", "cotrain.data_ratio=1"])
    assert code == 0
    metrics = json.loads((out / "final_metrics.json").read_text())
    assert 0 <= metrics["top1"] <= 1
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in line for line in lines)


def test_pretrain_errors_name_the_problem(tmp_path, capsys):
    assert main(["pretrain", "--config", str(DEMO), f"output_dir={tmp_path}"]) == 2
    assert "data.root is not set" in capsys.readouterr().err
    assert main(["pretrain", "--config", str(DEMO), f"data.root={tmp_path / 'nowhere'}"]) == 2
    assert "nowhere/train" in capsys.readouterr().err
    assert main(["pretrain", "--config", str(DEMO), "data.root=x", "cotrain.enabled=true"]) == 2
    assert "cotrain.pseudo_labels" in capsys.readouterr().err


@pytest.mark.slow  # two 2-rank jobs (forked: forked_ranks.py)
def test_two_ranks_evaluate_and_pseudo_label_like_one(tmp_path):
    root = make_folder_dataset(tmp_path / "data", num_classes=3, train_per_class=8, val_per_class=5)
    out = tmp_path / "ddp"
    result = run_ranks(main, ["pretrain", "--config", str(DEMO), f"data.root={root}", f"output_dir={out}",
                              "model.num_classes=3", "train.epochs=null", "train.steps=3", "train.batch_size=8",
                              "data.num_workers=0"])
    assert result.returncode == 0, result.stderr[-3000:]
    # The 15 validation images split over two ranks (8 + 7) and summed give what one process measures.
    task = build_task(load_config(PretrainConfig, DEMO, [f"data.root={root}", "model.num_classes=3",
                                                         "data.num_workers=0", "train.batch_size=8"]))
    task.model.net.load_state_dict(torch.load(out / "weights.pth", weights_only=True))
    single = task.evaluate(task.model.eval())
    ddp = json.loads((out / "final_metrics.json").read_text())
    assert ddp == pytest.approx(single, abs=1e-9)
    assert round(ddp["top1"] * 15) == pytest.approx(ddp["top1"] * 15, abs=1e-6)  # a count of the 15 images

    # Pseudo-labelling on two ranks: one shard each, the same labels and selection as one process.
    args = ["pseudo-label", "--teacher", str(out / "weights.pth"), "--images", str(root / "val"), "--model",
            "rs26-w0.25", "--image-size", "32", "--batch-size", "4", "--topk", "2", "--threshold", "0",
            "--num-workers", "0"]
    result = run_ranks(main, [*args, "--out", str(tmp_path / "pl2")])
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "pl2").glob("rank*.bin")) == ["rank00000-of-00002.bin",
                                                                           "rank00001-of-00002.bin"]
    assert main([*args, "--out", str(tmp_path / "pl1")]) == 0

    def labels(folder):
        _, table, selected = pseudo_label.read_selection(folder)
        return [(int(table["index"][row]), int(table["label"][row])) for row in selected]

    assert labels(tmp_path / "pl2") == labels(tmp_path / "pl1") and len(labels(tmp_path / "pl1")) == 15


def test_rs50_i160_config_trains_on_an_imagenet_layout_folder(tmp_path):
    root = make_folder_dataset(tmp_path / "data", num_classes=3, train_per_class=2, val_per_class=1,
                               min_side=150, max_side=220)
    config = DEMO.parent / "rs50_i160.yaml"
    out = tmp_path / "run"
    code = main(["pretrain", "--config", str(config), f"data.root={root}", f"output_dir={out}", "model.num_classes=3",
                 "train.epochs=null", "train.steps=1", "train.batch_size=2", "data.num_workers=0"])
    assert code == 0
    metrics = json.loads((out / "final_metrics.json").read_text())
    assert set(metrics) == {"top1", "top5"} and metrics["top5"] == 1.0  # 3 classes: top-5 holds every class
    saved = (out / "config.yaml").read_text()
    assert "name: rs50" in saved and "image_size: 160" in saved and "magnitude: 10.0" in saved
    create_model("rs50", num_classes=3, weights=str(out / "weights.pth"))
