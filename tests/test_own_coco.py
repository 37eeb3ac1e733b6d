"""coco_det: detection from the user's COCO JSON. COCO AP against cases computed by hand (crowd regions, images
without annotations); the readers on tiny JSON files in the real layout (non-contiguous category ids, degenerate
boxes, iscrowd, every malformed input as one error naming the file); one tiny end-to-end run of the demo config,
shared by the checks of its config.yaml, `predict` and `export`."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine_toy import CONFIGS
from rs_transfer.cli import main
from rs_transfer.config import ConfigError
from rs_transfer.downstream import coco_det, finetune
from rs_transfer.downstream.metrics import coco_box_ap
from rs_transfer.errors import DataError

CATEGORIES = [{"id": 7, "name": "square"}, {"id": 3, "name": "circle"}]  # unsorted ids with gaps, as exports have


def write_coco(root: Path, images=None, annotations=None, categories=None, split="train2017") -> Path:
    """annotations/instances_<split>.json and the listed images (grey JPEGs of the listed sizes) under `root`."""
    images = [{"id": 1, "file_name": "a.jpg", "height": 20, "width": 30}] if images is None else images
    annotations = [] if annotations is None else annotations
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / split).mkdir(exist_ok=True)
    for image in images:
        Image.new("RGB", (image["width"], image["height"]), (90, 90, 90)).save(root / split / image["file_name"])
    document = {"images": images, "annotations": annotations, "categories": CATEGORIES if categories is None else categories}
    path = root / "annotations" / f"instances_{split}.json"
    path.write_text(json.dumps(document))
    return path


def box(annotation_id, image_id=1, category_id=3, bbox=(1.5, 2.0, 10.0, 8.25), iscrowd=0) -> dict:
    return {"id": annotation_id, "image_id": image_id, "category_id": category_id, "bbox": list(bbox),
            "iscrowd": iscrowd, "area": 50.0}


def load(path: Path) -> coco_det.CocoSplit:
    return coco_det.load_split(path, path.parent.parent / path.stem.replace("instances_", ""))


# COCO AP by hand. Category 3 ("circle"), image 1: boxes A and B, and a crowd region C. Detections by score:
# A exact (0.9), one inside C (0.85: matched to the crowd region, neither TP nor FP), one on image 5, which has no
# annotation (0.8: FP), B exact (0.7). Precision/recall after each counted detection: (1, 1/2), (1/2, 1/2), (2/3, 1).
# COCO's interpolated precision is 1 at the 51 recall points 0, 0.01, ..., 0.5 and 2/3 at the 50 points above:
# AP = (51 + 50 * 2/3) / 101 = 253/303 at every IoU threshold (the true positives are exact).
# Category 7 ("square"), image 2: one box 10 x 10 and one detection 10 x 7.2 inside it, IoU 0.72: a true positive at
# the thresholds 0.5 ... 0.7 (AP 1), a miss at 0.75 ... 0.95 (AP 0): AP@[.5:.95] 0.5, AP50 1, AP75 0.
HAND_GT = {
    "images": [{"id": 1, "width": 100, "height": 100}, {"id": 2, "width": 100, "height": 100},
               {"id": 5, "width": 100, "height": 100}],
    "categories": CATEGORIES,
    "annotations": [
        {"id": 1, "image_id": 1, "category_id": 3, "bbox": [0, 0, 20, 20], "area": 400, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 3, "bbox": [50, 50, 20, 20], "area": 400, "iscrowd": 0},
        {"id": 3, "image_id": 1, "category_id": 3, "bbox": [0, 60, 30, 30], "area": 900, "iscrowd": 1},
        {"id": 4, "image_id": 2, "category_id": 7, "bbox": [0, 0, 10, 10], "area": 100, "iscrowd": 0},
    ],
}
HAND_DETECTIONS = [
    {"image_id": 1, "category_id": 3, "bbox": [0, 0, 20, 20], "score": 0.9},
    {"image_id": 1, "category_id": 3, "bbox": [5, 65, 10, 10], "score": 0.85},
    {"image_id": 5, "category_id": 3, "bbox": [0, 0, 20, 20], "score": 0.8},
    {"image_id": 1, "category_id": 3, "bbox": [50, 50, 20, 20], "score": 0.7},
    {"image_id": 2, "category_id": 7, "bbox": [0, 0, 10, 7.2], "score": 0.9},
]
CIRCLE_AP = (51 + 50 * 2 / 3) / 101


def test_coco_ap_matches_a_case_computed_by_hand():
    result = coco_box_ap(HAND_GT, HAND_DETECTIONS)
    assert result["per_category"] == pytest.approx({3: CIRCLE_AP, 7: 0.5})
    assert result["map"] == pytest.approx((CIRCLE_AP + 0.5) / 2)
    assert result["ap50"] == pytest.approx((CIRCLE_AP + 1) / 2)
    assert result["ap75"] == pytest.approx(CIRCLE_AP / 2)
    # Perfect detections score 1; no detection scores 0 (not an error: there is ground truth).
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
               for a in HAND_GT["annotations"] if not a["iscrowd"]]
    assert coco_box_ap(HAND_GT, perfect)["map"] == pytest.approx(1.0)
    assert coco_box_ap(HAND_GT, [])["map"] == 0.0


def test_coco_ap_without_a_non_crowd_box_is_an_error_not_a_number():
    crowd_only = {**HAND_GT, "annotations": [a for a in HAND_GT["annotations"] if a["iscrowd"]]}
    with pytest.raises(DataError, match="no non-crowd ground-truth box in 3 images: AP is undefined"):
        coco_box_ap(crowd_only, HAND_DETECTIONS)


class FixedDetections(torch.nn.Module):
    """A detector that answers every image with the same detections (labels 1..K, as torchvision's)."""

    def __init__(self, boxes, labels, scores):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))  # the evaluator reads the model's device from it
        self.output = {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels),
                       "scores": torch.tensor(scores)}

    def forward(self, batch):
        return [dict(self.output) for _ in batch["images"]]


def test_evaluator_maps_labels_back_to_the_jsons_category_ids(tmp_path):
    # labels: 1 = category 3 (the smallest id), 2 = category 7; the metrics name the original ids and names
    path = write_coco(tmp_path, split="val2017", annotations=[box(1, category_id=3, bbox=(0, 0, 10, 10)),
                                                              box(2, category_id=7, bbox=(15, 5, 10, 10))])
    split = load(path)
    assert split.category_ids == [3, 7] and split.class_names == ["circle", "square"]
    assert split.labels.tolist() == [0, 1]
    evaluate = coco_det.make_evaluator(split, batch_size=1)
    right = evaluate(FixedDetections([[0, 0, 10, 10], [15, 5, 25, 15]], [1, 2], [0.9, 0.8]))
    assert right == pytest.approx({"map": 1.0, "ap50": 1.0, "ap75": 1.0, "ap/3:circle": 1.0, "ap/7:square": 1.0})
    swapped = evaluate(FixedDetections([[0, 0, 10, 10], [15, 5, 25, 15]], [2, 1], [0.9, 0.8]))
    assert swapped["map"] == 0.0


def test_reader_skips_degenerate_boxes_by_id_and_keeps_crowd_and_empty_images_apart(tmp_path, caplog):
    images = [{"id": 10, "file_name": "a.jpg", "height": 20, "width": 30},
              {"id": 20, "file_name": "sub/b.png", "height": 24, "width": 16},  # a subfolder, as some tools write
              {"id": 30, "file_name": "c.jpg", "height": 20, "width": 30}]  # no annotation: a negative
    (tmp_path / "train2017" / "sub").mkdir(parents=True)
    annotations = [box(1, image_id=20, category_id=7), box(2, image_id=10, bbox=(5, 5, 0, 4)),
                   box(3, image_id=10, bbox=(40, 1, 5, 5)),  # wholly right of the 30-pixel-wide image
                   box(4, image_id=10, bbox=(-2.5, 3, 10, 30), iscrowd=1),  # reaches past two borders: clipped
                   box(5, image_id=10, category_id=3, bbox=(20.5, 1.25, 4, 5))]
    path = write_coco(tmp_path, images=images, annotations=annotations)
    with caplog.at_level(logging.WARNING):
        split = load(path)
    assert f"{path}: skipped 2 annotations" in caplog.text and "annotation ids: 2, 3" in caplog.text
    assert split.image_ids.tolist() == [10, 20, 30] and np.diff(split.starts).tolist() == [2, 1, 0]
    assert split.annotation_ids.tolist() == [4, 5, 1]  # grouped by image, the JSON's order within one
    np.testing.assert_allclose(split.boxes[0], [0, 3, 7.5, 20])
    dataset = coco_det.CocoDetection(split)
    first = dataset[0]
    assert first["labels"].tolist() == [0] and first["id"] == 10  # the crowd region is no training target
    torch.testing.assert_close(first["boxes"].as_subclass(torch.Tensor), torch.tensor([[20.5, 1.25, 24.5, 6.25]]))
    assert dataset[1]["labels"].tolist() == [1] and dataset[2]["boxes"].shape == (0, 4)
    crowd = [a for a in split.ground_truth()["annotations"] if a["iscrowd"]]
    assert [(a["id"], a["image_id"], a["category_id"]) for a in crowd] == [(4, 10, 3)]  # evaluation keeps it


@pytest.mark.parametrize("document, message", [
    ("{not json", r"is not valid JSON \(Expecting property name"),
    ({"annotations": None}, r'has no "annotations" list'),
    ({"annotations": [box(9, image_id=4)]}, r'annotation 9 has image_id 4, which is not in "images"'),
    ({"annotations": [box(9, category_id=5)]}, r'annotation 9 has category_id 5, which is not in "categories" '
                                               r"\(ids \[3, 7\]\)"),
    ({"annotations": [box(9), box(9)]}, "annotation id 9 is listed twice"),
    ({"annotations": [box(9, bbox=(1, 2, 3))]}, r"annotation 9 has bbox \[1, 2, 3\]: expected \[x, y, width, height\]"),
    ({"annotations": [{**box(9), "iscrowd": 2}]}, "annotation 9 has iscrowd 2: expected 0 or 1"),
    ({"annotations": [{**box(9), "image_id": "1"}]}, "annotation 9 has image_id '1': expected an integer"),
    ({"images": [{"id": 1, "file_name": "a.jpg", "height": 20, "width": 30}] * 2}, "image id 1 is listed twice"),
    ({"images": [{"id": 1, "file_name": "a.jpg", "width": 30}]}, r"image 1 \(a.jpg\) has height None"),
    ({"categories": [{"id": 3, "name": "a"}, {"id": 3, "name": "b"}]}, "category id 3 is listed twice"),
    ({"categories": []}, "lists no categories"),
])
def test_a_malformed_json_is_one_error_naming_it(tmp_path, document, message):
    path = write_coco(tmp_path)
    if isinstance(document, str):
        path.write_text(document)
    else:
        path.write_text(json.dumps({**json.loads(path.read_text()), **document}))
    with pytest.raises(DataError, match=message) as error:
        load(path)
    assert str(error.value).startswith(str(path))


def test_a_listed_image_that_is_missing_is_an_error_at_build_naming_it(tmp_path):
    images = [{"id": 1, "file_name": "a.jpg", "height": 20, "width": 30},
              {"id": 2, "file_name": "b.jpg", "height": 20, "width": 30}]
    path = write_coco(tmp_path, images=images)
    (tmp_path / "train2017" / "b.jpg").unlink()
    with pytest.raises(DataError, match=rf"1 of 2 images that {path} lists are missing; the first: "
                                        rf"{tmp_path / 'train2017' / 'b.jpg'} \(image id 2\)"):
        load(path)


def test_an_image_of_another_size_than_its_json_says_is_an_error_at_build_naming_both(tmp_path):
    path = write_coco(tmp_path)
    Image.new("RGB", (20, 30)).save(tmp_path / "train2017" / "a.jpg")  # 20 wide, 30 high
    with pytest.raises(DataError, match=r"a.jpg is 20x30 pixels, but .*instances_train2017.json says 30x20 .*"
                                        r"misplaced\.$"):
        load(path)  # at build, not when an epoch reaches the image
    # a phone picture stored 20x30 whose EXIF orientation turns it to the 30x20 the annotation tool showed
    exif = Image.Exif()
    exif[coco_det.EXIF_ORIENTATION] = 6
    Image.new("RGB", (20, 30)).save(tmp_path / "train2017" / "a.jpg", exif=exif)
    with pytest.raises(DataError, match=r"says 30x20 .* Its EXIF orientation tag turns it a quarter.*exif_transpose"):
        load(path)


def test_classes_come_from_the_train_json_and_a_config_that_disagrees_is_a_config_error(tmp_path):
    write_coco(tmp_path)
    write_coco(tmp_path, split="val2017", annotations=[box(1)])
    overrides = [f"data.root={tmp_path}", "model.name=rs26-w0.25", "task.fpn_channels=8", "task.det_fc_channels=8"]
    config = finetune.make_config("coco_det", overrides=overrides)
    finetune.build_task(config)
    assert (config.task.category_ids, config.task.class_names, config.model.num_classes) == ([3, 7], ["circle", "square"], 2)
    with pytest.raises(ConfigError, match=r"task.class_names=\['square', 'circle'\], but .*instances_train2017.json "
                                          r"lists \['circle', 'square'\]"):
        finetune.build_task(finetune.make_config("coco_det", overrides=overrides + ["task.class_names=[square,circle]"]))
    write_coco(tmp_path, split="val2017", categories=[{"id": 3, "name": "circle"}])
    with pytest.raises(DataError, match=r"instances_val2017.json lists the categories \{3: 'circle'\}, the training "
                                        r"JSON \{3: 'circle', 7: 'square'\}"):
        finetune.build_task(finetune.make_config("coco_det", overrides=overrides))
    write_coco(tmp_path, split="val2017", annotations=[box(1, iscrowd=1), box(2, bbox=(3, 3, -1, 5))])
    with pytest.raises(DataError, match=r"instances_val2017.json has no box to evaluate on .*: COCO AP would be "
                                        "undefined"):
        finetune.build_task(finetune.make_config("coco_det", overrides=overrides))
    with pytest.raises(ConfigError, match="task.category_ids is not set"):
        coco_det.build_model(finetune.make_config("coco_det"))


# (what is removed or set, the error's type, what the error names)
MISSING = [
    ("data.root", ConfigError, r"data.root is not set"),
    ("annotations/instances_train2017.json", DataError, r"missing .*instances_train2017.json: expected a COCO"),
    ("train2017", DataError, r"missing image folder .*train2017: expected the images that .*instances_train2017.json"),
    ("annotations/instances_val2017.json", DataError, r"missing .*instances_val2017.json: expected a COCO"),
    ("val2017", DataError, r"missing image folder .*val2017: expected the images that .*instances_val2017.json"),
    ("task.val_json=labels/val.json", DataError, r"missing .*labels/val.json: expected a COCO instances JSON"),
]


@pytest.mark.parametrize("piece, error, message", MISSING, ids=[piece for piece, _, _ in MISSING])
def test_check_data_names_each_missing_file_or_folder_without_reading_the_json(tmp_path, piece, error, message):
    for folder in ("annotations", "train2017", "val2017"):
        (tmp_path / folder).mkdir()
    for split in ("train2017", "val2017"):
        (tmp_path / "annotations" / f"instances_{split}.json").write_text("not JSON: reading it is build's job")
    config = coco_det.TASK.config()
    config.data.root = str(tmp_path)
    coco_det.TASK.check_data(config)  # the whole layout passes, its JSON unread
    if piece == "data.root":
        config.data.root = None
    elif piece.startswith("task."):
        config.task.val_json = piece.partition("=")[2]
    elif piece.endswith(".json"):
        (tmp_path / piece).unlink()
    else:
        (tmp_path / piece).rmdir()
    with pytest.raises(error, match=message):
        coco_det.TASK.check_data(config)


def test_cli_names_the_json_in_one_error_line_with_exit_code_2(tmp_path, capsys):
    path = write_coco(tmp_path, annotations=[box(17, image_id=99)])
    write_coco(tmp_path, split="val2017")  # the layout is whole: the error is the train JSON's content
    assert main(["finetune", "--task", "coco_det", f"data.root={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f'error: {path}: annotation 17 has image_id 99, which is not in "images"'


def test_synthetic_coco_has_the_pitfalls_of_real_exports(tmp_path, caplog):
    coco_det.write_coco_det(tmp_path, train=6, val=4, size=(40, 56))
    with caplog.at_level(logging.WARNING):
        splits = [load(tmp_path / "annotations" / f"instances_{s}.json") for s in ("train2017", "val2017")]
    for split in splits:
        assert split.category_ids == [3, 7, 42] and split.class_names == ["red", "green", "blue"]
        counts = np.diff(split.starts)
        assert counts[0] == 0 and counts[1:].min() > 0  # image 0 is a negative
        assert split.crowd.sum() == 1 and (~split.crowd).sum() > 0
        assert split.sizes[0].tolist() == [40, 56] and split.sizes[1].tolist() == [56, 40]
        assert not np.allclose(split.boxes, split.boxes.round())  # float boxes
    assert caplog.text.count("skipped 1 annotation whose box has no area") == 2  # one degenerate box per split


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The demo config for a few steps on the synthetic COCO layout: (run folder, its final metrics)."""
    folder = tmp_path_factory.mktemp("coco_det")
    config = finetune.make_config("coco_det", config_path=CONFIGS / "downstream" / "coco_det_demo.yaml", overrides=[
        f"output_dir={folder / 'run'}", f"data.root={folder / 'data'}", "train.steps=6", "train.warmup_steps=0",
        "data.synthetic_images=6", "train.batch_size=2", "task.eval_batch_size=4"])
    return folder / "run", finetune.run(config, synthetic=True)


def test_demo_run_reports_coco_ap_under_the_jsons_category_ids(demo_run):
    import yaml

    run_dir, metrics = demo_run
    assert json.loads((run_dir / "final_metrics.json").read_text()) == pytest.approx(metrics)
    per_category = {key for key in metrics if key.startswith("ap/")}
    assert {"map", "ap50", "ap75"} <= set(metrics) and per_category <= {"ap/3:red", "ap/7:green", "ap/42:blue"}
    assert per_category and all(0 <= value <= 1 for value in metrics.values())
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["task"]["category_ids"] == [3, 7, 42] and saved["task"]["class_names"] == ["red", "green", "blue"]
    assert saved["model"]["num_classes"] == 3


def test_predict_writes_the_runs_detections_with_names_and_category_ids(demo_run, tmp_path):
    from rs_transfer.predict import predict
    from rs_transfer.predictor import read_image
    from rs_transfer.runs import load_run

    run_dir, _ = demo_run
    images = run_dir.parent / "data" / "val2017"
    predict(run_dir, [images], tmp_path)  # the run alone: its config.yaml carries the classes
    run = load_run(run_dir)
    records = json.loads((tmp_path / "predictions.json").read_text())["predictions"]
    assert len(records) == len(list(images.glob("*.jpg"))) and sum(len(r["detections"]) for r in records) > 0
    for record in records:
        with torch.no_grad():
            expected = run.model({"images": [read_image(record["input"])]})[0]
        boxes = torch.tensor([d["box"] for d in record["detections"]]).reshape(-1, 4)
        torch.testing.assert_close(boxes, expected["boxes"], rtol=0, atol=1e-4)
        assert [(d["class"], d["category_id"]) for d in record["detections"]] == [
            (["red", "green", "blue"][label - 1], [3, 7, 42][label - 1]) for label in expected["labels"].tolist()]
        assert (tmp_path / record["drawn"]).is_file()


def test_export_of_the_run_matches_its_backbone_and_fpn(demo_run, tmp_path):
    from rs_transfer.export import export_run

    run_dir, _ = demo_run
    exported = export_run(run_dir, "torchscript", tmp_path / "model.ts", resolution=64)
    assert exported.path.is_file() and exported.max_abs_diff <= 1e-4
