"""Metrics against hand-computed cases: VOC07 11-point AP50, whole-set mIoU with ignore pixels, depth delta."""

import json
import math

import numpy as np
import pytest
import torch

import dense_eval_toy

from rs_transfer.downstream.metrics import MeanIoU, class_ap, depth_metrics, depth_sums, voc07_ap, voc07_map


def gt(boxes, difficult=None):
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return boxes, np.asarray(difficult if difficult is not None else [False] * len(boxes), dtype=bool)


def test_voc07_11_point_interpolation_by_hand():
    # Recall reaches 0.5 at precision 1, then 1.0 at precision 0.5: points 0..0.5 (6 of them) give 1, 0.6..1 give 0.5.
    assert voc07_ap(np.array([0.5, 0.5, 1.0]), np.array([1.0, 0.5, 2 / 3])) == pytest.approx((6 * 1 + 5 * 2 / 3) / 11)
    assert voc07_ap(np.array([0.5, 1.0]), np.array([1.0, 0.5])) == pytest.approx((6 + 5 * 0.5) / 11)


def test_ap_duplicate_detection_is_a_false_positive():
    truth = {"a": gt([[0, 0, 10, 10], [20, 20, 30, 30]])}
    dets = [("a", 0.9, [0, 0, 10, 10]), ("a", 0.8, [0, 0, 10, 10.5]), ("a", 0.7, [20, 20, 30, 30])]
    # TP, FP (duplicate), TP: recall 0.5, 0.5, 1 at precision 1, 0.5, 2/3 -> 11-point AP (6 + 5 * 2/3) / 11.
    assert class_ap(dets, truth) == pytest.approx((6 + 5 * 2 / 3) / 11)


def test_ap_difficult_boxes_are_neither_hit_nor_miss():
    truth = {"a": gt([[0, 0, 10, 10], [20, 20, 30, 30]], difficult=[False, True])}
    # The detection on the difficult box is ignored; the one positive is found first: AP 1.
    assert class_ap([("a", 0.9, [20, 20, 30, 30]), ("a", 0.8, [0, 0, 10, 10])], truth) == pytest.approx(1.0)
    # Missing the difficult box costs nothing either.
    assert class_ap([("a", 0.8, [0, 0, 10, 10])], truth) == pytest.approx(1.0)


def test_ap_iou_threshold_and_best_match_rule():
    truth = {"a": gt([[0, 0, 10, 10]])}
    # IoU exactly 0.5 is not a match (the devkit needs > 0.5): [0, 0, 10, 5] overlaps half the box.
    assert class_ap([("a", 0.9, [0, 0, 10, 5])], truth) == 0.0
    # A detection in an image without this class's boxes is a false positive ahead of the true one.
    truth2 = {"a": gt([[0, 0, 10, 10]]), "b": gt(np.zeros((0, 4)))}
    ap = class_ap([("b", 0.9, [0, 0, 10, 10]), ("a", 0.8, [0, 0, 10, 10])], truth2)
    assert ap == pytest.approx(0.5)  # recall 1 only at precision 1/2


def test_ap_no_detections_and_absent_class():
    truth = {"a": gt([[0, 0, 10, 10]])}
    assert class_ap([], truth) == 0.0
    assert class_ap([("a", 0.9, [0, 0, 10, 10])], {"a": gt(np.zeros((0, 4)))}) is None  # nothing to find


def test_voc07_map_leaves_absent_classes_out_of_the_mean():
    truth = {
        "img1": ([[0, 0, 10, 10], [20, 20, 40, 40]], [0, 1], [False, False]),
        "img2": (np.zeros((0, 4)), [], []),  # an image with no objects
    }
    dets = [("img1", 0, 0.9, [0, 0, 10, 10]), ("img2", 2, 0.8, [0, 0, 5, 5])]
    result = voc07_map(dets, truth, ["cat", "dog", "cow"])
    assert result["ap50_per_class"] == {"cat": pytest.approx(1.0), "dog": 0.0, "cow": None}
    assert result["ap50"] == pytest.approx(0.5)


def test_miou_whole_set_confusion_matrix_with_ignore():
    # Two "images"; 255 pixels must count nowhere. Whole-set confusion (rows truth, columns prediction):
    #   truth 0: pred 0 x3, pred 1 x1 ; truth 1: pred 1 x2, pred 0 x1 ; truth 2: pred 2 x1 ; class 3 absent.
    # IoU0 = 3 / (4 + 4 - 3) = 0.6, IoU1 = 2 / (3 + 3 - 2) = 0.5, IoU2 = 1; class 3 left out: mIoU = 0.7.
    # Averaging per image instead would give another number, which is why the matrix is over the whole set.
    metric = MeanIoU(num_classes=4)
    metric.update(torch.tensor([0, 0, 1, 1, 3]), torch.tensor([0, 0, 0, 1, 255]))
    metric.update(torch.tensor([0, 1, 0, 2, 2]), torch.tensor([0, 1, 1, 2, 255]))
    result = metric.compute()
    assert result["miou"] == pytest.approx(0.7)
    assert result["iou/0"] == pytest.approx(0.6) and result["iou/1"] == pytest.approx(0.5)
    assert "iou/3" not in result


def test_depth_metrics_by_hand():
    gt_depth = torch.tensor([[1.0, 2.0, 4.0, 8.0, 0.0]])  # one image
    pred = torch.tensor([[1.2, 3.0, 4.0, 6.0, 5.0]])
    valid = gt_depth > 0
    m = depth_metrics(depth_sums(pred, gt_depth, valid, 1e-3, 10.0))
    # ratios 1.2, 1.5, 1.0, 1.333: two of four below 1.25.
    assert m["delta1"] == pytest.approx(0.5)
    assert m["abs_rel"] == pytest.approx((0.2 / 1 + 1 / 2 + 0 + 2 / 8) / 4)
    assert m["rmse"] == pytest.approx(math.sqrt((0.04 + 1 + 0 + 4) / 4))
    assert m["pixels"] == 4 and m["images"] == 1


def depth_pair():
    """Two images of 4 pixels (0 = no ground truth): image 0 has 1 valid pixel, image 1 has 3."""
    gt_depth = torch.tensor([[2.0, 0.0, 0.0, 0.0], [1.0, 1.0, 4.0, 0.0]])
    pred = torch.tensor([[4.0, 9.0, 9.0, 9.0], [1.0, 1.1, 5.0, 9.0]])
    return pred, gt_depth, gt_depth > 0


def test_depth_errors_per_image_then_over_images_or_pooled_over_pixels():
    pred, gt_depth, valid = depth_pair()
    sums = depth_sums(pred, gt_depth, valid, 1e-3, 10.0)
    images, pixels = depth_metrics(sums, average="images"), depth_metrics(sums, average="pixels")
    # image 0: ratio 2 (miss), abs-rel 1, RMSE 2 m; image 1: ratios 1, 1.1, 1.25 (1.25 is not < 1.25): 1/3 miss,
    # abs-rel (0 + 0.1 + 0.25) / 3, RMSE sqrt((0 + 0.01 + 1) / 3)
    image_rmse = (2.0 + math.sqrt(1.01 / 3)) / 2  # BTS / AdaBins: the mean of the images' RMSEs
    assert images["delta1"] == pytest.approx((0 + 2 / 3) / 2)
    assert images["abs_rel"] == pytest.approx((1 + 0.35 / 3) / 2)
    assert images["rmse"] == pytest.approx(image_rmse)
    assert pixels["delta1"] == pytest.approx(2 / 4)
    assert pixels["abs_rel"] == pytest.approx((1 + 0.35) / 4)
    assert pixels["rmse"] == pytest.approx(math.sqrt((4 + 1.01) / 4))
    for m in (images, pixels):  # both averages are always there, named; the plain names follow `average`
        assert m["rmse_images"] == pytest.approx(image_rmse) and m["rmse_pixels"] == pytest.approx(pixels["rmse"])
        assert (m["pixels"], m["images"], m["nonfinite_pixels"], m["nonfinite_images"]) == (4, 2, 0.0, 0.0)


def test_nonfinite_depth_predictions_are_counted_and_evaluated_as_bts_does():
    pred, gt_depth, valid = depth_pair()
    pred[1, 1], pred[1, 2], pred[0, 1] = float("nan"), float("inf"), float("nan")  # the last on no ground truth
    m = depth_metrics(depth_sums(pred, gt_depth, valid, 1e-3, 10.0), average="pixels")
    assert m["nonfinite_pixels"] == pytest.approx(2 / 4) and m["nonfinite_images"] == pytest.approx(1 / 2)
    # NaN evaluated as depth_min (1e-3 m), inf as depth_max (10 m): finite errors, both misses
    assert m["delta1"] == pytest.approx(1 / 4)
    assert m["rmse"] == pytest.approx(math.sqrt((4 + 0 + (1 - 1e-3) ** 2 + 36) / 4))
    assert all(math.isfinite(v) for v in m.values())


def test_depth_average_defaults_to_per_image_and_is_checked():
    from rs_transfer.config import ConfigError
    from rs_transfer.downstream import finetune

    assert finetune.make_config("nyu_depth").task.depth_average == "images"  # BTS / AdaBins, the published numbers
    with pytest.raises(ConfigError, match="task.depth_average='mean' makes no sense here: it must be one of images, "
                                          "pixels"):
        finetune.make_config("nyu_depth", overrides=["task.depth_average=mean"])


def test_metrics_with_nothing_to_measure_raise_instead_of_nan_inf_or_zero():
    from rs_transfer.errors import DataError

    with pytest.raises(DataError, match="depth evaluation found no valid ground-truth depth"):
        depth_metrics(depth_sums(torch.ones(1, 3), torch.zeros(1, 3), torch.zeros(1, 3, dtype=torch.bool), 1e-3, 10.0))
    metric = MeanIoU(num_classes=3)
    metric.update(torch.tensor([0, 1, 2]), torch.tensor([255, 255, 255]))
    with pytest.raises(DataError, match="no labelled pixel"):
        metric.compute()
    only_difficult = {"img1": ([[0, 0, 10, 10]], [0], [True]), "img2": (np.zeros((0, 4)), [], [])}
    with pytest.raises(DataError, match="no non-difficult ground-truth box in 2 images"):
        voc07_map([("img1", 0, 0.9, [0, 0, 10, 10])], only_difficult, ["cat"])


def test_a_class_only_predicted_has_iou_0_in_the_mean():
    # Two gloo ranks give these numbers too: test_every_dense_evaluator_gives_one_process_numbers_on_two.
    metric = MeanIoU(num_classes=4)
    metric.update(torch.tensor([0, 1, 3, 3]), torch.tensor([0, 1, 1, 255]))
    expected = metric.compute()
    assert expected == pytest.approx({"miou": (1 + 0.5 + 0) / 3, "iou/0": 1.0, "iou/1": 0.5, "iou/3": 0.0})


SIZES = ((40, 52), (48, 64), (56, 40), (64, 64))  # every validation image of another size, as real sets have


class MixedSizes(torch.utils.data.Dataset):
    """Images of SIZES with a label map (segmentation) or a depth map (metres), drawn from a fixed seed."""

    def __init__(self, kind: str):
        generator = torch.Generator().manual_seed(0)
        self.samples = []
        for height, width in SIZES:
            image = torch.randint(0, 256, (3, height, width), generator=generator, dtype=torch.uint8)
            target = (torch.randint(0, 3, (height, width), generator=generator).to(torch.uint8) if kind == "mask"
                      else 0.5 + 4 * torch.rand(height, width, generator=generator))
            self.samples.append({"image": image, kind: target})

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        return self.samples[index]


@pytest.mark.parametrize("task", ["segmentation", "depth"])
def test_dense_metrics_do_not_depend_on_the_evaluation_batch(task):
    # A padded batch let the network see other images' padding: mIoU moved with task.eval_batch_size (and with the
    # number of processes). Each size is now its own batch: batch 4 gives batch 1's numbers exactly.
    from rs_transfer.downstream import nyu_depth, segmentation
    from rs_transfer.downstream.fpn import DepthModel, SegmentationModel

    torch.manual_seed(0)
    if task == "segmentation":
        model = SegmentationModel("rs26-w0.25", 3, fpn_channels=16, head_channels=16).eval()
        results = [segmentation.make_evaluator(MixedSizes("mask"), 3, batch)(model) for batch in (1, 4)]
    else:
        model = DepthModel("rs26-w0.25", fpn_channels=16, head_channels=16).eval()
        section = nyu_depth.NYUDepthSection(eigen_crop=False)
        results = []
        for batch in (1, 4):
            section.eval_batch_size = batch
            results.append(nyu_depth.make_evaluator(MixedSizes("depth"), section)(model))
    assert results[0] == results[1]


def test_evaluation_batches_hold_one_image_size_each():
    from rs_transfer.engine.loader import eval_batches

    samples = [{"image": torch.zeros(3, *size), "i": i} for i, size in enumerate([(8, 8), (8, 9), (8, 8), (9, 8)])]
    batches = list(eval_batches(samples, 4, lambda group: [s["i"] for s in group]))
    assert batches == [[0, 2], [1], [3]]


@pytest.fixture(scope="module")
def dense_data(tmp_path_factory):
    """dense_eval_toy's tiny dataset of every dense task, written once for the tests below."""
    root = tmp_path_factory.mktemp("dense")
    dense_eval_toy.write_data(root)
    return root


def _same_result(got: dict, expected: dict) -> None:
    # To float round-off: a batch of 5 and 5 batches of 1 run other convolution kernels (depth sums moved 1e-10).
    assert got["metrics"] == pytest.approx(expected["metrics"], rel=1e-6, abs=1e-9)
    assert got["digest"] == pytest.approx(expected["digest"], rel=1e-6)


@pytest.mark.parametrize("case, task, overrides", dense_eval_toy.CASES, ids=[c[0] for c in dense_eval_toy.CASES])
def test_every_dense_evaluator_gives_batch_1s_numbers_at_batch_8(dense_data, case, task, overrides):
    # Every dense task (segmentation, depth, detection; windows and TTA too) through its own build and evaluator.
    one, eight = (dense_eval_toy.evaluate(dense_data, task, overrides, batch) for batch in (1, 8))
    _same_result(eight, one)
    assert one["digest"] != 0 and one["metrics"]


@pytest.mark.slow  # two ranks that build eight models each
def test_every_dense_evaluator_gives_one_process_numbers_on_two(dense_data, tmp_path):
    # One 2-rank job evaluates every case; 5 images split 2 + 3 over the ranks, metrics reduced or gathered, digests
    # summed. The ranks are forked from this process (forked_ranks.py: no torchrun agent, no imports to pay).
    from forked_ranks import run_ranks

    out = tmp_path / "two.json"
    result = run_ranks(dense_eval_toy.main, [str(dense_data), str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    two = json.loads(out.read_text())
    for case, task, overrides in dense_eval_toy.CASES:
        _same_result(two[case], dense_eval_toy.evaluate(dense_data, task, overrides, 8))
