"""Heads on the shared backbone: FPN levels and strides, dense output shapes, the Faster R-CNN wiring, and the
protocol numbers against PAPER.md (section 5, Table 5)."""

import pytest
import torch

from rs_transfer.downstream import finetune, protocol, registry
from rs_transfer.downstream.fpn import BackboneFPN, DensePredictor


def test_fpn_gives_p3_to_p7_at_strides_8_to_128():
    fpn = BackboneFPN("rs26-w0.25", channels=16).eval()
    with torch.no_grad():
        pyramid = fpn(torch.randn(1, 3, 256, 192))
    assert list(pyramid) == ["p3", "p4", "p5", "p6", "p7"]
    for (name, level), stride in zip(pyramid.items(), (8, 16, 32, 64, 128)):
        assert level.shape == (1, 16, -(-256 // stride), -(-192 // stride)), name  # ceil: 192 / 128 -> 2


@pytest.mark.parametrize("outputs, size", [(21, (64, 96)), (1, (70, 50))])
def test_dense_head_predicts_at_input_size(outputs, size):
    net = DensePredictor("rs26-w0.25", outputs, fpn_channels=16, head_channels=8).eval()
    with torch.no_grad():
        out = net(torch.randint(0, 255, (2, 3, *size), dtype=torch.uint8))
    assert out.shape == (2, outputs, *size)
    assert len(net.head.convs) == 3  # 3 x (conv 3x3 + BN + ReLU), then the 1x1 predictor


def test_backbone_weights_load_into_the_fpn_body(tmp_path):
    from rs_transfer.models import create_model

    source = create_model("rs26-w0.25", num_classes=10)
    torch.save(source.state_dict(), tmp_path / "w.pth")
    fpn = BackboneFPN("rs26-w0.25", weights=str(tmp_path / "w.pth"), channels=16)
    assert torch.equal(fpn.body.layer4[1].conv3.weight, source.layer4[1].conv3.weight)


def test_protocol_matches_paper():
    # PAPER.md section 5, copied here independently of protocol.py.
    assert protocol.LEARNING_RATES == (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32)
    assert protocol.WEIGHT_DECAY == 1e-4 and protocol.SCHEDULE == "cosine" and protocol.SCALE_RANGE == (0.5, 2.0)
    expected = {"cifar100": (512, None, 5000, 20000), "pascal_seg": (64, 512, 5000, 20000),
                "pascal_det": (32, 896, 5000, 20000), "nyu_depth": (64, 640, 10000, 40000)}
    for task, (batch, crop, low, high) in expected.items():
        p = protocol.protocols()[task]
        assert (p.batch_size, p.crop_size, min(p.steps), max(p.steps)) == (batch, crop, low, high), task
    assert len(protocol.grid("pascal_seg")) == 7 * 3
    assert protocol.protocols()["cifar100"].image_size == 256  # "images resized to 256x256"


# The package's tasks (an installed plugin's task follows its own protocol, not necessarily the paper's).
@pytest.mark.parametrize("name", tuple(registry.MODULES))
def test_each_tasks_full_config_holds_its_protocol(name):
    # The run reads these values from the task's YAML; the Protocol is the one place the paper's numbers are
    # stated, so the full config (not the demo) must say the same.
    p = registry.get(name).protocol
    config = finetune.make_config(name)
    assert config.train.batch_size == p.batch_size
    assert getattr(config.task, "crop_size", None) == p.crop_size
    assert getattr(config.task, "image_size", None) == p.image_size
    assert config.train.weight_decay == protocol.WEIGHT_DECAY and config.train.schedule == protocol.SCHEDULE
    if p.crop_size is not None:  # the crop tasks jitter the scale; cifar100 resizes whole images
        assert (config.task.scale_min, config.task.scale_max) == protocol.SCALE_RANGE
    # The default config is one point of the grid, whose learning rates are absolute.
    assert config.train.steps in p.steps and config.train.lr in protocol.LEARNING_RATES
    assert config.train.scale_lr is False


@pytest.mark.parametrize("name", tuple(registry.MODULES))
def test_sweep_runs_every_protocol_learning_rate_at_every_protocol_length(name, tmp_path, monkeypatch):
    import json

    ran = []

    def fake_run(config, synthetic=False):
        ran.append((config.train.lr, config.train.steps))
        (tmp_path / protocol.point_name(config.train.lr, config.train.steps)).mkdir()
        (tmp_path / protocol.point_name(config.train.lr, config.train.steps) / "final_metrics.json").write_text(
            json.dumps({registry.get(name).metric: 0.5}))

    monkeypatch.setattr(finetune, "run", fake_run)
    summary = finetune.sweep(name, overrides=[f"output_dir={tmp_path}"])
    steps = registry.get(name).protocol.steps
    assert ran == [(lr, s) for s in steps for lr in protocol.LEARNING_RATES]
    assert len(summary["points"]) == len(protocol.LEARNING_RATES) * len(steps)


def test_table5_matches_paper():
    # PAPER.md section 5, Table 5 (CIFAR-100, VOC det, VOC seg, ADE seg, NYU depth), copied by hand.
    paper = """R152 supervised 90 85.5 80.0 70.0 40.2 81.2
    R152 SimCLR 800 87.1 83.3 72.2 41.0 83.5
    R152 SimCLRv2 800 84.7 79.1 73.1 41.1 84.7
    R152 RS 400 88.1 82.2 78.2 42.2 83.4
    R152-2x supervised 90 86.6 81.1 72.2 41.4 82.5
    R152-2x SimCLR 800 89.0 85.3 78.8 45.2 86.8
    R152-2x SimCLRv2 800 84.8 80.1 75.5 42.5 86.1
    R152-2x RS 400 89.3 84.1 79.2 44.1 84.7"""
    rows = {}
    for line in paper.splitlines():
        backbone, method, epochs, *values = line.split()
        rows[(backbone.replace("-", " "), method, int(epochs))] = tuple(float(v) for v in values)
    assert protocol.table5() == rows
    assert protocol.table5_tasks() == ("cifar100", "pascal_det", "pascal_seg", "ade_seg", "nyu_depth")
    assert protocol.paper_value("R152", "RS", "pascal_seg") == 78.2


def record_sweep_runs(tmp_path, monkeypatch, metric: str) -> list:
    """finetune.run replaced by a recorder of (lr, steps) that leaves each point a finished result in tmp/sweep."""
    import json

    from rs_transfer.downstream import finetune

    ran = []

    def fake_run(config, synthetic=False):
        ran.append((config.train.lr, config.train.steps))
        out = tmp_path / "sweep" / protocol.point_name(config.train.lr, config.train.steps)
        out.mkdir(parents=True)
        (out / "final_metrics.json").write_text(json.dumps({metric: 0.5}))

    monkeypatch.setattr(finetune, "run", fake_run)
    return ran


def test_sweep_point_i_runs_the_i_th_point_of_protocol_grid(tmp_path, monkeypatch):
    # One order everywhere: `sweep` runs grid(task) in order, `sweep --point I` runs grid(task)[I].
    from rs_transfer.downstream import finetune

    ran = record_sweep_runs(tmp_path, monkeypatch, "miou")
    grid = protocol.grid("pascal_seg")
    for index in (0, 1, 7, 20):
        finetune.sweep("pascal_seg", overrides=[f"output_dir={tmp_path / 'sweep'}"], point=index)
    assert ran == [grid[0], grid[1], grid[7], grid[20]]
    assert grid[:2] == [(0.005, 5000), (0.01, 5000)] and grid[7] == (0.005, 10000)


def test_sweep_grid_comes_from_its_options_and_a_grid_key_override_is_refused(tmp_path, monkeypatch, capsys):
    # `sweep ... train.steps=20` used to run 5000-step points: the grid replaced the override without a word
    from rs_transfer import cli

    ran = record_sweep_runs(tmp_path, monkeypatch, "top1")
    base = ["sweep", "--task", "cifar100", f"output_dir={tmp_path / 'sweep'}"]
    assert cli.main([*base, "train.steps=20"]) == 2
    assert "sweep sets train.lr and train.steps per grid point, so train.steps=20 would be ignored" in \
        capsys.readouterr().err
    assert cli.main([*base, "--steps", "20,40", "--learning-rates", "0.01"]) == 0
    assert ran == [(0.01, 20), (0.01, 40)]
    assert cli.main([*base, "--steps", "20,-4"]) == 2 and "--steps values must be positive" in capsys.readouterr().err


def test_sweep_reuses_a_finished_point_only_if_it_ran_the_same_config(tmp_path, monkeypatch):
    import json

    from rs_transfer.config import save_config
    from rs_transfer.downstream import finetune

    ran = []

    def fake_run(config, synthetic=False):
        ran.append(config.model.name)
        save_config(config, config.output_dir)
        (tmp_path / "sweep" / "lr0.005_steps5000" / "final_metrics.json").write_text(json.dumps({"miou": 0.5}))

    monkeypatch.setattr(finetune, "run", fake_run)
    sweep_dir = f"output_dir={tmp_path / 'sweep'}"
    finetune.sweep("pascal_seg", backbone="rs26-w0.25", overrides=[sweep_dir], point=0)
    # The same point again, from another place on another machine: reused.
    finetune.sweep("pascal_seg", backbone="rs26-w0.25", overrides=[sweep_dir, "data.num_workers=0"], point=0)
    assert ran == ["rs26-w0.25"]
    with pytest.raises(finetune.UserError, match=r"lr0.005_steps5000 holds a finished grid point of another config "
                                                 r"\(model.name: 'rs26-w0.25' there, 'rs26-w0.5' now\)"):
        finetune.sweep("pascal_seg", backbone="rs26-w0.5", overrides=[sweep_dir], point=0)


def _seg_net():
    torch.manual_seed(0)
    return DensePredictor("rs26-w0.25", 3, fpn_channels=16, head_channels=8).eval()


def test_mmseg_windows_end_at_the_border_and_a_short_side_is_one_window():
    from rs_transfer.downstream.dense_inference import window_starts

    # mmseg slide_inference: grids = max(size - crop + stride - 1, 0) // stride + 1, the last window moved back
    assert window_starts(100, 64, 32) == [0, 32, 36]
    assert window_starts(128, 64, 64) == [0, 64]
    assert window_starts(40, 64, 32) == [0]  # smaller than the crop: one window of the image's own size


def test_slide_equals_whole_when_the_crop_covers_the_image_and_averages_overlaps():
    from rs_transfer.downstream.dense_inference import Inference, infer

    net = _seg_net()
    images = torch.randint(0, 256, (2, 3, 40, 56), dtype=torch.uint8)
    with torch.no_grad():
        whole = net(images)
        assert torch.equal(infer(net, images, Inference("slide", crop=64, stride=32), probabilities=True), whole)
        # Windows of 32 every 16: rows start at 0, 8 (the last moved back to the border), columns at 0, 16, 24
        slid = infer(net, images, Inference("slide", crop=32, stride=16), probabilities=True)
        total, count = torch.zeros_like(whole), torch.zeros(40, 56)
        for top in (0, 8):
            for left in (0, 16, 24):
                total[..., top:top + 32, left:left + 32] += net(images[..., top:top + 32, left:left + 32])
                count[top:top + 32, left:left + 32] += 1
    assert count.min() == 1 and count.max() == 6
    assert not torch.allclose(slid, whole, atol=1e-3)  # the windows do see less context
    torch.testing.assert_close(slid, total / count)


def test_flip_tta_is_the_mean_of_the_image_and_its_flip_and_exact_on_a_symmetric_input():
    from rs_transfer.downstream.dense_inference import Inference, infer

    net = _seg_net()
    images = torch.randint(0, 256, (2, 3, 32, 48), dtype=torch.uint8)
    with torch.no_grad():
        expected = (net(images).softmax(1) + net(images.flip(-1)).flip(-1).softmax(1)) / 2
        assert torch.equal(infer(net, images, Inference(tta="flip"), probabilities=True), expected)
        # ms_flip at the one scale 1.0 is flip TTA
        assert torch.equal(infer(net, images, Inference(tta="ms_flip", scales=(1.0,)), probabilities=True), expected)
        ms = infer(net, images, Inference(tta="ms_flip", scales=(0.5, 1.5)), probabilities=True)
    assert ms.shape == (2, 3, 32, 48) and torch.allclose(ms.sum(1), torch.ones(2, 32, 48))
    # Depth: a mirror-symmetric image through a per-pixel network gives the same depth with and without flip TTA.
    symmetric = torch.cat([images[..., :24], images[..., :24].flip(-1)], -1).float()
    depth = lambda x: x.float().mean(1, keepdim=True) / 25.5 + 0.1  # noqa: E731 (metres, flip equivariant)
    assert torch.equal(infer(depth, symmetric, Inference(tta="flip"), probabilities=False), depth(symmetric))


def test_metric_names_say_how_the_numbers_were_computed():
    from rs_transfer.downstream import nyu_depth, pascal_seg
    from rs_transfer.downstream.dense_inference import rename_metrics

    seg, depth = registry.get("pascal_seg"), registry.get("nyu_depth")
    assert seg.metric_of(pascal_seg.PascalSegSection()) == "miou"  # the default: unchanged
    assert seg.metric_of(pascal_seg.PascalSegSection(eval_mode="slide")) == "miou_slide"
    assert seg.metric_of({"eval_mode": "slide", "tta": "ms_flip"}) == "miou_slide_ms_flip"  # a config.yaml's dict
    assert seg.metric_of({}) == "miou"  # a run written before these keys
    assert depth.metric_of(nyu_depth.NYUDepthSection(tta="flip")) == "delta1_flip"
    assert registry.get("pascal_det").metric_of({"tta": "flip"}) == "ap50_flip"
    assert rename_metrics({"miou": 1, "iou/cat": 2, "pixels": 3}, "_slide", keep=("pixels",)) == {
        "miou_slide": 1, "iou_slide/cat": 2, "pixels": 3}


@pytest.mark.parametrize("override, message", [
    ("task.eval_mode=slide task.slide_stride=600", "slide_stride=600 and task.slide_crop=512"),
    ("task.slide_crop=0", "task.slide_crop=0 makes no sense"),
    ("task.tta=ms_flip task.tta_scales=[]", "task.tta_scales is empty"),
    ("task.tta_scales=[1.0,-0.5]", "task.tta_scales=.* must be > 0"),
    ("task.tta=ms", "task.tta='ms' makes no sense here: it must be one of none, flip, ms_flip"),
    ("task.eval_mode=sliding", "task.eval_mode='sliding' .* one of whole, slide"),
    # a window or scale key outside its mode was silently ignored
    ("task.slide_crop=256", "task.slide_crop=256 has no effect with task.eval_mode=whole: set task.eval_mode=slide"),
    ("task.tta_scales=[1.0,1.5]", r"task.tta_scales=\[1.0, 1.5\] has no effect with task.tta=none: set task.tta=ms_flip"),
])
def test_bad_inference_keys_name_the_key(override, message):
    from rs_transfer.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        finetune.make_config("nyu_depth", overrides=override.split())


def test_a_run_evaluated_in_windows_picks_its_best_checkpoint_by_its_own_metric(tmp_path):
    from rs_transfer.config import EVAL_KEYS
    from rs_transfer.downstream import folder_seg

    folder_seg.write_synthetic(tmp_path, 2, 2)
    config = finetune.make_config("folder_seg", overrides=[
        f"data.root={tmp_path}", "model.name=rs26-w0.25", "task.fpn_channels=8", "task.head_channels=8",
        "task.eval_mode=slide", "task.slide_crop=64", "task.slide_stride=48", "data.num_workers=0"])
    built = registry.get("folder_seg").build(config)
    metrics = built.evaluate(built.model.eval())
    assert built.primary_metric == "miou_slide" and built.primary_metric in metrics
    assert not any(key.startswith("iou/") for key in metrics) and any(k.startswith("iou_slide/") for k in metrics)
    assert {"task.eval_mode", "task.slide_crop", "task.slide_stride", "task.tta", "task.tta_scales"} <= EVAL_KEYS


def found_boxes(calls: list, score_of=None):
    """A flip-equivariant stand-in for Detector.detect: each non-zero channel c of an image is one detection of label
    c + 1, its box the bounding box of the channel's non-zero pixels (continuous pixel edges), its score the
    channel's peak (or score_of(call number)). Records (size, images) of every call in `calls`."""
    def detect(images, size):
        calls.append((size, images))
        outputs = []
        for image in images:
            boxes, labels, scores = [], [], []
            for channel in range(3):
                rows, cols = image[channel].nonzero(as_tuple=True)
                if len(rows):
                    boxes.append([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1])
                    labels.append(channel + 1)
                    scores.append(score_of(len(calls)) if score_of else image[channel].max())
            outputs.append({"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                            "labels": torch.tensor(labels, dtype=torch.int64),
                            "scores": torch.tensor(scores, dtype=torch.float32)})
        return outputs

    return detect


def tiny_detector(**tta):
    from rs_transfer.downstream.detection import Detector

    torch.manual_seed(0)
    return Detector("rs26-w0.25", 3, fpn_channels=16, fc_channels=32, train_size=64, eval_size=64, **tta).eval()


def test_flipped_detections_map_back_to_the_original_box_and_merge_per_class():
    # detectron2's GeneralizedRCNNWithTTA: run each view, undo its flip, concatenate, per-class NMS, keep the top.
    detector = tiny_detector(tta="flip")
    calls = []
    detector.detect = found_boxes(calls, score_of=lambda call: 0.5 if call == 1 else 0.8)  # the mirror scores higher
    image = torch.zeros(3, 24, 40, dtype=torch.uint8)
    image[:2, 3:10, 5:15] = 200  # labels 1 and 2 on one box, off-centre: its mirror is at x 25..35
    with torch.no_grad():
        found = detector({"images": [image]})[0]
    assert [size for size, _ in calls] == [64, 64]
    assert torch.equal(calls[1][1][0], calls[0][1][0].flip(-1))  # the second view is the mirrored image
    # the kept detections are the mirror's (score 0.8), mapped back exactly; NMS per class keeps both labels
    assert found["scores"].tolist() == pytest.approx([0.8, 0.8]) and sorted(found["labels"].tolist()) == [1, 2]
    assert found["boxes"].tolist() == [[5.0, 3.0, 15.0, 10.0]] * 2
    detector.detector.roi_heads.detections_per_img = 1  # task.det_max_per_image: the top detection only
    with torch.no_grad():
        assert len(detector({"images": [image]})[0]["boxes"]) == 1


def test_multi_scale_flip_runs_every_scale_with_and_without_the_mirror():
    detector = tiny_detector(tta="ms_flip", tta_scales=(0.5, 1.25))
    calls = []
    detector.detect = found_boxes(calls)
    image = torch.zeros(3, 24, 40, dtype=torch.uint8)
    image[0, 3:10, 5:15] = 200
    with torch.no_grad():
        found = detector({"images": [image]})[0]
    assert [size for size, _ in calls] == [32, 32, 80, 80]  # scale x task.det_eval_size (64), detectron2's order
    assert found["boxes"].tolist() == [[5.0, 3.0, 15.0, 10.0]]


def test_ms_flip_on_the_real_detector_keeps_detections_of_its_views():
    # torchvision's FasterRCNN at each view's size: every merged detection is one of the views' own, mapped back
    from torchvision.transforms.v2.functional import horizontal_flip_bounding_boxes
    from torchvision.tv_tensors import BoundingBoxFormat

    detector = tiny_detector(tta="ms_flip", tta_scales=(0.75, 1.0))
    image = torch.randint(0, 256, (3, 48, 64), dtype=torch.uint8)
    with torch.no_grad():
        found = detector({"images": [image]})[0]
        views = []
        for size in (48, 64):
            views.append(detector.detect([image.float() / 255], size)[0])
            mirrored = detector.detect([image.flip(-1).float() / 255], size)[0]
            boxes = horizontal_flip_bounding_boxes(mirrored["boxes"], BoundingBoxFormat.XYXY, (48, 64))
            views.append({**mirrored, "boxes": boxes})
    union = torch.cat([torch.cat([v["boxes"], v["scores"][:, None], v["labels"][:, None].float()], 1) for v in views])
    assert 0 < len(found["boxes"]) <= 100 < len(union)
    for box, score, label in zip(found["boxes"], found["scores"], found["labels"]):
        row = torch.cat([box, score[None], label[None].float()])
        assert (union - row).abs().amax(1).min() < 1e-5
    assert found["scores"][0] == union[:, 4].max()


def symmetric_set() -> list:
    """Two images symmetric about their vertical centre line: one true positive (aeroplane, score ~0.59), and a
    brighter aeroplane-coloured region with no ground truth (a false positive, ~0.9) beside an undetected bird."""
    first, second = torch.zeros(3, 24, 40, dtype=torch.uint8), torch.zeros(3, 24, 40, dtype=torch.uint8)
    first[0, 4:13, 15:25] = 150
    second[0, 2:8, 10:30] = 230
    samples = []
    for index, (image, box, label) in enumerate(((first, [15, 4, 25, 13], 0), (second, [5, 12, 35, 20], 2))):
        samples.append({"image": image, "boxes": torch.tensor([box], dtype=torch.float32),
                        "labels": torch.tensor([label]), "difficult": torch.tensor([False]), "id": f"im{index}"})
    return samples


def test_flip_tta_on_symmetric_images_gives_the_single_scale_ap_under_its_own_name():
    from rs_transfer.downstream.pascal_det import make_evaluator

    samples = symmetric_set()
    results = {}
    for tta in ("none", "flip"):
        detector = tiny_detector(tta=tta)
        detector.detect = found_boxes([])
        results[tta] = make_evaluator(samples, 2, tta=tta)(detector)
    # aeroplane: the false positive ranks first, precision 1/2 at recall 1 -> AP 0.5; bird: AP 0. Without the merge
    # the mirrored duplicates would count as false positives.
    assert results["none"]["ap50"] == pytest.approx(0.25)
    assert results["flip"] == pytest.approx({"ap50_flip": results["none"]["ap50"], "ap50_flip/aeroplane": 0.5,
                                             "ap50_flip/bird": 0.0})


def test_tta_keys_are_checked_and_the_primary_metric_follows_them(tmp_path):
    import json

    from rs_transfer.config import ConfigError
    from rs_transfer.families import primary_metric
    from rs_transfer.reproduce.table5 import reproduce_table5

    assert registry.get("coco_det").metric_of(finetune.make_config("coco_det", overrides=["task.tta=flip"]).task) \
        == "map_flip"
    assert registry.get("pascal_det").metric_of(finetune.make_config("pascal_det").task) == "ap50"
    assert primary_metric("transfer", "pascal_det", {"name": "pascal_det", "tta": "ms_flip"}) == "ap50_ms_flip"
    assert primary_metric("transfer", "nyu_depth", {"name": "nyu_depth"}) == "delta1"
    for override, message in (("task.tta=flipped", "task.tta='flipped' makes no sense here: it must be one of none, "
                                                   "flip, ms_flip"),
                              ("task.tta_scales=[]", "task.tta_scales is empty"),
                              ("task.tta_scales=[0.5,100]", "task.tta_scales holds 100: with task.det_eval_size=896")):
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
            finetune.make_config("pascal_det", overrides=[override])
    # Table 5 reads a run's own metric (here from its config.yaml) and names it: the paper's numbers are single-scale
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("task:\n  name: pascal_det\n  tta: flip\n")
    (run / "final_metrics.json").write_text(json.dumps({"ap50_flip": 0.6}))
    table = reproduce_table5([f"ours:pascal_det={run}"], tmp_path / "t5")
    assert table["ours"][0]["pascal_det"] == pytest.approx(60.0)
    markdown = (tmp_path / "t5" / "table5.md").read_text()
    assert "| ours | - | 60.0 |" in markdown
    assert "Not single-scale whole-image (the paper's protocol): ours pascal_det: ap50_flip" in markdown


def test_a_sweep_with_tta_collects_the_tta_metric(tmp_path, monkeypatch):
    ran = record_sweep_runs(tmp_path, monkeypatch, "ap50_flip")
    summary = finetune.sweep("pascal_det", overrides=[f"output_dir={tmp_path / 'sweep'}", "task.tta=flip"], point=0)
    assert len(ran) == 1 and summary["metric"] == "ap50_flip" and summary["best"]["ap50_flip"] == 0.5
