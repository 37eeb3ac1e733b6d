"""End to end through the shared engine: rs26-w0.25 fine-tuned on generated datasets in each task's real format
beats the trivial predictor by a wide margin; one task under 2-process gloo DDP; CLI errors (the sweep and Table 5
plumbing: test_reproduce_table5.py)."""

import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from engine_toy import CONFIGS
from rs_transfer.downstream import finetune, nyu_depth
from rs_transfer.downstream.nyu_depth import NYUDepth, eval_mask

DEMO = CONFIGS / "downstream"


def run_demo(task, tmp_path, *overrides):
    config = finetune.make_config(task, config_path=DEMO / f"{task}_demo.yaml",
                                  overrides=[f"output_dir={tmp_path / 'run'}", f"data.root={tmp_path / 'data'}", *overrides])
    metrics = finetune.run(config, synthetic=True)
    saved = json.loads((tmp_path / "run" / "final_metrics.json").read_text())
    assert saved == pytest.approx(metrics)
    return metrics


@pytest.mark.slow
def test_pascal_seg_end_to_end(tmp_path):
    metrics = run_demo("pascal_seg", tmp_path, "train.steps=120")
    # Trivial predictor: everything background. Its mIoU is IoU(background) over the classes present.
    from rs_transfer.downstream.pascal_seg import voc_items
    from rs_transfer.downstream.segmentation import SegmentationSet

    masks = torch.cat([s["mask"].flatten() for s in SegmentationSet(voc_items(tmp_path / "data", "val"), 21)])
    masks = masks[masks != 255]
    trivial = (masks == 0).float().mean().item() / len(masks.unique())
    assert trivial < 0.3 and metrics["miou"] > trivial + 0.4, (metrics, trivial)
    # TensorBoard shows the overlays of 4 fixed validation images at every evaluation; the last ones are what
    # `predict` draws with the run's final weights (EMA)
    val = SegmentationSet(voc_items(tmp_path / "data", "val"), 21)
    pictures = tensorboard_pictures(tmp_path / "run")
    assert sorted(pictures) == sorted(f"predictions/val_{i}" for i in (0, 4, 7, 11)) and len(val) == 12
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(pictures["predictions/val_0"]) == sum(e["kind"] == "eval" for e in events) >= 1
    from rs_transfer.downstream.pascal_seg import PREDICTOR
    from rs_transfer.runs import load_run

    run = load_run(tmp_path / "run")
    image = val[7]["image"].as_subclass(torch.Tensor)
    with torch.no_grad():
        drawn = PREDICTOR.draw(image, PREDICTOR.predict(run.model, run.config, image), None)
    assert torch.equal(pictures["predictions/val_7"][-1], drawn)


def tensorboard_pictures(run_dir: Path) -> dict:
    """tag -> [uint8 (3, H, W) per logged step, in step order] from the run's TensorBoard event files."""
    import io

    import numpy as np
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={IMAGES: 0})
    events.Reload()
    return {tag: [torch.from_numpy(np.array(Image.open(io.BytesIO(e.encoded_image_string)).convert("RGB")))
                  .permute(2, 0, 1) for e in sorted(events.Images(tag), key=lambda e: e.step)]
            for tag in events.Tags()[IMAGES]}


@pytest.mark.slow
def test_cifar100_end_to_end(tmp_path, caplog):
    caplog.set_level("INFO", logger="rs_transfer")
    metrics = run_demo("cifar100", tmp_path, "train.steps=100")
    # the log names the dataset's folder, not the staging folder it is written into first
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("writing a synthetic")]
    assert len(said) == 1 and said[0].endswith(f" val images) to {tmp_path / 'data'}"), said
    # the metric is said once, in the engine's run summary (finetune repeated it, and demo then a third time)
    assert sum("top1 = " in r.getMessage() for r in caplog.records) == 1
    assert metrics["top1"] > 0.6  # 10 classes used, equally many images each: chance 0.1
    # The engine's weights.pth is the network alone: it loads strictly, classifier included, into the zoo model.
    from rs_transfer.models import create_model
    from rs_transfer.models.weights import load_weights

    name = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["model"]["name"]
    load_weights(create_model(name, num_classes=100), tmp_path / "run" / "weights.pth", new_classifier=False)


@pytest.mark.slow
def test_nyu_depth_end_to_end(tmp_path):
    metrics = run_demo("nyu_depth", tmp_path, "train.steps=120")
    # Trivial predictor: the median training depth everywhere.
    train = NYUDepth(tmp_path / "data", "train")
    median = torch.cat([s["depth"][s["depth"] > 0] for s in train]).median()
    hits = total = 0
    for sample in NYUDepth(tmp_path / "data", "val"):
        gt = sample["depth"][None]
        valid = eval_mask(gt, 1e-3, 10.0, True, [tuple(gt.shape[-2:])])
        ratio = torch.maximum(median / gt[valid], gt[valid] / median)
        hits, total = hits + (ratio < 1.25).sum().item(), total + valid.sum().item()
    assert metrics["pixels"] == total  # every evaluated pixel counted once
    assert metrics["delta1_pixels"] > hits / total + 0.3, (metrics, hits / total)  # both pooled over pixels


@pytest.mark.slow
def test_pascal_det_end_to_end(tmp_path):
    metrics = run_demo("pascal_det", tmp_path, "train.steps=150", "data.synthetic_images=32")
    # A detector that has learnt nothing scores near 0 (random boxes rarely reach IoU 0.5).
    assert metrics["ap50"] > 0.25, metrics


@pytest.mark.slow
def test_two_process_gloo_ddp_covers_the_validation_set_once(tmp_path):
    nyu_depth.write_nyu_h5(tmp_path / "data", train=16, val=5)  # 5 images over 2 ranks: uneven shards
    from forked_ranks import run_ranks
    from rs_transfer.cli import main

    # what is checked is the evaluation's coverage, which no number of training steps changes: 2 steps, no warmup
    result = run_ranks(main, ["finetune", "--task", "nyu_depth", "--config", str(DEMO / "nyu_depth_demo.yaml"),
                              f"data.root={tmp_path / 'data'}", f"output_dir={tmp_path / 'ddp'}", "train.steps=2",
                              "train.warmup_steps=0"], timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "ddp" / "final_metrics.json").read_text())
    expected = 0
    for sample in NYUDepth(tmp_path / "data", "val"):
        gt = sample["depth"][None]
        expected += eval_mask(gt, 1e-3, 10.0, True, [tuple(gt.shape[-2:])]).sum().item()
    assert metrics["pixels"] == expected and 0 <= metrics["delta1"] <= 1


@pytest.mark.parametrize("args, message", [
    (["finetune", "--task", "pascal_seg", "--config", str(DEMO / "pascal_seg_demo.yaml")], "data.root is not set"),
    (["finetune", "--task", "pascal_seg", "train.stepz=3"], "did you mean 'train.steps'"),
    (["finetune", "--task", "ade_seg", "data.root=/nonexistent"], "ADE20K .*not found"),
    (["reproduce", "table5", "--result", "x:cifar100=/nonexistent"], "neither sweep.json nor final_metrics.json"),
    (["reproduce", "table5", "--checkpoint", "RS-152=rs152:w.pth"], "needs at least one --data TASK=DIR"),
    (["reproduce", "table5", "--checkpoint", "RS-152", "--data", "cifar100=/d"], "bad --checkpoint 'RS-152'"),
    (["reproduce", "table5", "--data", "cifar10=/d"], "bad --data 'cifar10=/d'"),
    (["reproduce", "table5"], "nothing to put in Table 5"),
    (["sweep", "--task", "cifar100", "--point", "21"], "outside the grid of 21 points"),
    (["finetune", "--task", "pascal_seg", "--synthetic", "model.num_classes=20"], "set model.num_classes=21"),
])
def test_cli_errors_are_one_line(args, message, tmp_path, capsys):
    from rs_transfer.cli import main

    assert main(args + ([f"output_dir={tmp_path}"] if args[0] == "finetune" else [])) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert re.search(message, err), err


@pytest.mark.parametrize("task", ["pascal_det", "ade_seg"])
def test_task_builds_trains_one_step_and_evaluates(task, tmp_path):
    # Wiring only (the demos show these two learn; see docs/downstream.md): the config builds the task, a batch
    # of the collate function trains, and the evaluator returns the primary metric with the DDP-free reductions.
    finetune.write_synthetic(task, tmp_path / "data", 4)
    config = finetune.make_config(task, config_path=DEMO / f"{task}_demo.yaml", overrides=[f"data.root={tmp_path / 'data'}"])
    built = finetune.build_task(config)
    batch = built.collate_fn([built.train_set[i] for i in range(2)])
    built.model.train()
    loss = built.model(batch)["loss"]
    loss.backward()
    assert torch.isfinite(loss)
    built.model.eval()
    metrics = built.evaluate(built.model)
    assert 0 <= metrics[built.primary_metric] <= 1
