"""`rs-transfer predict`: one tiny trained run per task family (a couple of steps: the weights need not be good,
only the run's own), then what predict must give: masks equal the model's argmax, boxes equal the evaluator's
detections, depth PNGs round-trip to the predicted metres within 1 mm, top-5 JSON equals the logits' top-5; and the
errors (bad run folder, missing weights.pth, corrupt images)."""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from engine_toy import CONFIGS
from rs_transfer.cli import main
from rs_transfer.downstream import finetune
from rs_transfer.downstream.cifar100 import CLASSES as CIFAR_CLASSES
from rs_transfer.predict import predict
from rs_transfer.predictor import read_image
from rs_transfer.families import family_of_config
from rs_transfer.runs import RunError, load_run

TINY = ["train.steps=2", "train.warmup_steps=0", "data.synthetic_images=4", "train.batch_size=2",
        "task.eval_batch_size=2"]


def train_transfer(task: str, folder: Path, *overrides) -> Path:
    config = finetune.make_config(task, config_path=CONFIGS / "downstream" / f"{task}_demo.yaml", overrides=[
        f"output_dir={folder / 'run'}", f"data.root={folder / 'data'}", *TINY, *overrides])
    finetune.run(config, synthetic=True)
    return folder / "run"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """task -> trained run folder, each trained on first use and shared by the module's tests."""
    trained = {}

    def get(task: str, *overrides) -> Path:
        if task not in trained:
            trained[task] = train_transfer(task, tmp_path_factory.mktemp(task), *overrides)
        return trained[task]

    return get


def records(out: Path) -> list:
    return json.loads((out / "predictions.json").read_text())["predictions"]


@pytest.mark.parametrize("task, folder, offset", [
    ("pascal_seg", "VOCdevkit/VOC2012/JPEGImages", 0),
    ("ade_seg", "ADEChallengeData2016/images/validation", 1),
])
def test_segmentation_masks_are_the_models_argmax_in_the_datasets_indices(task, folder, offset, runs, tmp_path):
    run_dir = runs(task, "train.ema_decay=0.5")  # weights.pth then holds the EMA weights: those are used
    images = run_dir.parent / "data" / folder
    predict(run_dir, [images], tmp_path)
    model = load_run(run_dir).model
    found = records(tmp_path)
    assert len(found) == len(list(images.glob("*.jpg")))
    for record in found:
        with Image.open(tmp_path / record["mask"]) as png:
            assert png.mode == "P"
            mask = np.array(png)
        image = read_image(record["input"])
        with torch.no_grad():
            argmax = model({"image": image[None]})[0].argmax(0).numpy()
        np.testing.assert_array_equal(mask, argmax + offset)
        assert (tmp_path / record["overlay"]).is_file()
        assert sum(c["fraction"] for c in record["classes"]) == pytest.approx(1)


def test_detection_boxes_are_the_evaluators_detections(runs, tmp_path):
    from rs_transfer.downstream.pascal_det import CLASSES, VOCDetection, image_sets, make_evaluator

    run_dir = runs("pascal_det")
    run = load_run(run_dir)
    test_set = VOCDetection(image_sets(run.config.data.root, [run.config.task.det_test_set]))
    seen = []

    class Recorder(torch.nn.Module):  # the evaluator calls model(batch); record what it gets back
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, batch):
            outputs = self.model(batch)
            seen.extend(outputs)
            return outputs

    make_evaluator(test_set, batch_size=1)(Recorder(run.model))
    predict(run_dir, [item[0] for item in test_set.items], tmp_path)
    found = records(tmp_path)
    assert len(found) == len(seen) == len(test_set)
    for record, expected in zip(found, seen):
        boxes = torch.tensor([d["box"] for d in record["detections"]]).reshape(-1, 4)
        torch.testing.assert_close(boxes, expected["boxes"], rtol=0, atol=1e-4)
        assert [d["class"] for d in record["detections"]] == [CLASSES[i - 1] for i in expected["labels"].tolist()]
        assert [d["score"] for d in record["detections"]] == pytest.approx(expected["scores"].tolist(), abs=1e-5)
        assert (tmp_path / record["drawn"]).is_file()


def test_predict_takes_the_evaluation_keys_so_detection_tta_is_the_models(runs, tmp_path, capsys):
    from rs_transfer.downstream.detection import detect_with_tta

    run_dir = runs("pascal_det")
    image = sorted((run_dir.parent / "data" / "VOCdevkit" / "VOC2007" / "JPEGImages").glob("test*.jpg"))[-1]
    # an override after --images is one: the words of --images that are not files but key=value move back
    assert main(["predict", "--run", str(run_dir), "--images", str(image), "task.tta=flip", "--out",
                 str(tmp_path / "flip")]) == 0
    run = load_run(run_dir, overrides=["task.tta=flip"])
    assert run.config.task.tta == "flip" and run.model.tta == "flip"
    with torch.no_grad():
        expected = detect_with_tta(run.model, [read_image(image).float() / 255])[0]
    found = records(tmp_path / "flip")[0]["detections"]
    assert len(found) == len(expected["boxes"]) > 0
    torch.testing.assert_close(torch.tensor([d["box"] for d in found]), expected["boxes"], rtol=0, atol=1e-4)
    capsys.readouterr()
    # single-scale boxes would mix with the flip's in one predictions.json: refused
    assert main(["predict", "--run", str(run_dir), "--images", str(image), "--out", str(tmp_path / "flip")]) == 2
    assert "holds this run's predictions with the overrides ['task.tta=flip'], not []" in capsys.readouterr().err
    # a key that would describe another network than weights.pth is refused, naming it
    assert main(["predict", "--run", str(run_dir), "task.fpn_channels=8", "--images", str(image), "--out",
                 str(tmp_path / "other")]) == 2
    assert "'task.fpn_channels=8': task.fpn_channels is not an evaluation setting" in capsys.readouterr().err


def test_depth_pngs_round_trip_to_the_predicted_metres(runs, tmp_path):
    from rs_transfer.downstream import nyu_depth

    run_dir = runs("nyu_depth")
    run = load_run(run_dir)
    images = tmp_path / "images"
    images.mkdir()
    for i, sample in enumerate(nyu_depth.NYUDepth(run.config.data.root, "val")):
        Image.fromarray(sample["image"].permute(1, 2, 0).numpy()).save(images / f"{i}.png")
    predict(run_dir, [images], tmp_path / "out")
    for record in records(tmp_path / "out"):
        with Image.open(tmp_path / "out" / record["depth"]) as png:
            millimetres = np.array(png)
        assert millimetres.dtype == np.uint16
        with torch.no_grad():
            expected = nyu_depth.predict(run.model, run.config, read_image(record["input"])).numpy()
        assert np.abs(millimetres / 1000.0 - expected).max() <= 1e-3
        assert (tmp_path / "out" / record["view"]).is_file()


def top5_of(logits: torch.Tensor) -> list:
    return logits.float().softmax(0).topk(5).indices.tolist()


def test_cifar100_top5_json_is_the_logits_top5(runs, tmp_path):
    run_dir = runs("cifar100")
    run = load_run(run_dir)
    with open(Path(run.config.data.root) / "cifar-100-python" / "test", "rb") as f:
        pixels = pickle.load(f, encoding="bytes")[b"data"][:3].reshape(-1, 3, 32, 32)
    for i, image in enumerate(pixels):
        Image.fromarray(image.transpose(1, 2, 0)).save(tmp_path / f"{i}.png")
    predict(run_dir, sorted(tmp_path.glob("*.png")), tmp_path / "out")
    for record in records(tmp_path / "out"):
        with torch.no_grad():
            logits = run.model({"image": read_image(record["input"])[None]})[0]
        assert [c["index"] for c in record["top5"]] == top5_of(logits)
        assert [c["class"] for c in record["top5"]] == [CIFAR_CLASSES[i] for i in top5_of(logits)]


def test_pretrain_top5_names_the_class_folders(tmp_path):
    from rs_transfer.pretrain.run import pretrain
    from rs_transfer.pretrain.synthetic import make_folder_dataset
    from rs_transfer.pretrain.transforms import eval_transform

    data = make_folder_dataset(tmp_path / "data", num_classes=6, train_per_class=2, val_per_class=1)
    pretrain(str(CONFIGS / "pretrain" / "demo.yaml"), [f"data.root={data}", f"output_dir={tmp_path / 'run'}",
                                                        "train.epochs=null", "train.steps=1", "train.warmup_epochs=0",
                                                        "data.num_workers=0", "train.batch_size=4"])
    assert family_of_config(yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())) == ("pretrain", None)
    summary = predict(tmp_path / "run", [data / "val"], tmp_path / "out")
    assert summary["class_names"] == f"the class folders of {data / 'train'}"
    run = load_run(tmp_path / "run")
    for record in summary["predictions"]:
        with Image.open(record["input"]) as image:
            batch = eval_transform(32)(image.convert("RGB"))[None]
        with torch.no_grad():
            logits = run.model({"image": batch})[0]
        assert [c["index"] for c in record["top5"]] == top5_of(logits)
        assert [c["class"] for c in record["top5"]] == [f"class_{i:03d}" for i in top5_of(logits)]


def test_video_top5_is_the_view_averaged_top5(tmp_path):
    from rs_transfer.video.run import run_train
    from rs_transfer.video.task import decode_eval_frames, video_probabilities

    run_train(str(CONFIGS / "video" / "demo.yaml"), [f"data.root={tmp_path / 'data'}", f"output_dir={tmp_path / 'run'}",
                                                   "train.epochs=null", "train.steps=1", "train.batch_size=4",
                                                   "data.max_eval_videos=2", "train.warmup_steps=0"])
    videos = sorted((tmp_path / "data" / "val").rglob("*.mp4"))[:2]
    summary = predict(tmp_path / "run", videos, tmp_path / "out")
    run = load_run(tmp_path / "run")
    assert summary["class_names"] == "data.class_names of the run's config"  # filled in when the run was built
    for record, video in zip(summary["predictions"], videos):
        frames, count = decode_eval_frames(video, run.config.data)
        with torch.no_grad():
            probs = video_probabilities(run.model, frames, count, run.config.data, torch.device("cpu"))
        assert [c["index"] for c in record["top5"]] == probs.topk(4).indices.tolist()  # 4 classes: top-4


def test_a_corrupt_image_is_skipped_and_counted_and_bad_runs_are_one_error_line(runs, tmp_path, capsys):
    run_dir = runs("nyu_depth")
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    Image.new("RGB", (40, 30), (90, 20, 200)).save(images / "sub" / "good.jpg")
    (images / "broken.png").write_bytes(b"not a png")
    assert main(["predict", "--run", str(run_dir), "--images", str(images), "--out", str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert [Path(r["input"]).name for r in summary["predictions"]] == ["good.jpg"]
    assert summary["complete"] and [Path(s["input"]).name for s in summary["skipped"]] == ["broken.png"]
    assert (tmp_path / "out" / "depth" / "sub" / "good.png").is_file()  # names keep the folder structure

    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    cases = [
        (["--run", str(tmp_path / "missing"), "--images", str(images)], "run folder not found"),
        (["--run", str(no_weights), "--images", str(images)], "no weights.pth"),
        (["--run", str(tmp_path), "--images", str(images)], "no config.yaml"),
        (["--run", str(run_dir), "--images", str(images / "broken.png")], "broken.png"),
        (["--run", str(run_dir), "--images", str(tmp_path / "nothing")], "not found"),
    ]
    capsys.readouterr()
    for args, message in cases:
        assert main(["predict", *args, "--out", str(tmp_path / "out2")]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and message in err, err


def test_a_run_of_no_known_family_cannot_be_loaded(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"model": {"name": "rs26-w0.25"}, "data": {}}))
    (tmp_path / "weights.pth").write_bytes(b"")
    with pytest.raises(RunError, match=r"config.yaml: .* none of the keys that mark a run family: task.name \(transfer\)"):
        load_run(tmp_path)


def copy_run(run_dir: Path, folder: Path) -> Path:
    """Another run folder with the same config and weights: a different run to predict with."""
    folder.mkdir()
    for name in ("config.yaml", "weights.pth"):
        (folder / name).write_bytes((run_dir / name).read_bytes())
    return folder


def picture(path: Path, colour=(90, 20, 200)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), colour).save(path)
    return path


def test_predicting_again_into_the_same_out_merges_and_another_run_is_refused(runs, tmp_path, capsys):
    run_dir, out = runs("nyu_depth"), tmp_path / "out"
    first, second = picture(tmp_path / "a" / "first.jpg"), picture(tmp_path / "b" / "second.jpg")
    assert main(["predict", "--run", str(run_dir), "--images", str(first), "--out", str(out)]) == 0
    assert main(["predict", "--run", str(run_dir), "--images", str(second), "--out", str(out)]) == 0
    assert sorted(Path(r["input"]).name for r in records(out)) == ["first.jpg", "second.jpg"]
    other = copy_run(run_dir, tmp_path / "other_run")
    capsys.readouterr()
    assert main(["predict", "--run", str(other), "--images", str(first), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out ") and "another run" in err and len(err.strip().splitlines()) == 1
    assert len(records(out)) == 2


def test_a_file_inside_a_given_folder_is_predicted_once_and_colliding_stems_keep_their_suffix(runs, tmp_path):
    images, out = tmp_path / "images", tmp_path / "out"
    gray = picture(images / "gray.png")
    picture(images / "x.jpg"), picture(images / "x.png", (10, 200, 30))
    assert main(["predict", "--run", str(runs("nyu_depth")), "--images", str(images), str(gray),
                 "--out", str(out)]) == 0
    assert sorted(Path(r["input"]).name for r in records(out)) == ["gray.png", "x.jpg", "x.png"]
    assert sorted(p.name for p in (out / "depth").iterdir()) == ["gray.png", "x.jpg.png", "x.png.png"]


def test_files_that_are_not_inputs_are_listed_as_ignored(runs, tmp_path):
    images, out = tmp_path / "images", tmp_path / "out"
    picture(images / "a.jpg")
    (images / "notes.txt").write_text("notes")
    assert main(["predict", "--run", str(runs("nyu_depth")), "--images", str(images), "--out", str(out)]) == 0
    summary = json.loads((out / "predictions.json").read_text())
    assert summary["ignored"] == [{"input": str(images / "notes.txt"), "reason": "not an input file type"}]


def test_a_run_given_as_its_config_file_names_the_folder(runs, tmp_path, capsys):
    run_dir = runs("nyu_depth")
    picture(tmp_path / "a.jpg")
    assert main(["predict", "--run", str(run_dir / "config.yaml"), "--images", str(tmp_path / "a.jpg"),
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "is a file" in err and str(run_dir) in err and len(err.strip().splitlines()) == 1


def test_one_predict_per_out_folder_at_a_time(runs, tmp_path):
    from engine_toy import folder_held
    from rs_transfer.files import FolderInUseError

    run = runs("cifar100")
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    with folder_held(tmp_path / "out") as pid:
        with pytest.raises(FolderInUseError, match=rf"--out {tmp_path / 'out'} is in use .*pid {pid}"):
            predict(run, [str(image)], tmp_path / "out")
    assert len(predict(run, [str(image)], tmp_path / "out")["predictions"]) == 1


def test_predict_takes_the_evaluation_keys_and_refuses_others(runs, tmp_path, capsys):
    # `task.eval_mode=slide task.tta=flip`: the depth written is dense_inference's, as the evaluator computes it
    from rs_transfer.downstream import nyu_depth
    from rs_transfer.downstream.dense_inference import Inference

    run_dir = runs("nyu_depth")
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 72, 3), dtype=np.uint8)).save(images / "a.png")
    keys = ["task.eval_mode=slide", "task.slide_crop=32", "task.slide_stride=24", "task.tta=flip"]
    assert main(["predict", "--run", str(run_dir), "--images", str(images), "--out", str(tmp_path / "out"),
                 *keys]) == 0
    run = load_run(run_dir)
    image = read_image(images / "a.png")
    with torch.no_grad():
        whole = nyu_depth.predict(run.model, run.config, image).numpy()
        windows = nyu_depth.depth_outputs(run.model, image[None], Inference("slide", 32, 24, "flip"))[0]
    expected = windows.clamp(run.config.task.depth_min, run.config.task.depth_max).numpy()
    with Image.open(tmp_path / "out" / "depth" / "a.png") as png:
        metres = np.array(png) / 1000.0
    assert np.abs(metres - expected).max() <= 1e-3 and np.abs(metres - whole).max() > 2e-3
    capsys.readouterr()
    assert main(["predict", "--run", str(run_dir), "--images", str(images), "--out", str(tmp_path / "out2"),
                 "train.lr=0.1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "'train.lr=0.1'" in err and len(err.strip().splitlines()) == 1
