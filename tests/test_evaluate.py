"""`rs-transfer evaluate`: one tiny finished run per task family (every transfer task, pretraining, video) evaluated
again with its own settings gives its final_metrics.json; overrides take evaluation keys only; --data, --checkpoint,
--out; the run's own files are never written."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

import rs_transfer.evaluate
from engine_toy import CONFIGS
from rs_transfer.cli import main
from rs_transfer.config import EVAL_KEYS, flatten, read_yaml
from test_predict import train_transfer

TRANSFER_TASKS = ("cifar100", "pascal_seg", "ade_seg", "folder_seg", "nyu_depth", "pascal_det", "coco_det",
                  "folder_cls")


def train_pretrain(folder: Path, *overrides) -> Path:
    from rs_transfer.pretrain.run import pretrain
    from rs_transfer.pretrain.synthetic import make_folder_dataset

    data = make_folder_dataset(folder / "data", num_classes=6, train_per_class=2, val_per_class=2)
    pretrain(str(CONFIGS / "pretrain" / "demo.yaml"), [
        f"data.root={data}", f"output_dir={folder / 'run'}", "train.epochs=null", "train.steps=1",
        "train.warmup_epochs=0", "data.num_workers=0", "train.batch_size=4", "train.ema_decay=0.5", *overrides])
    return folder / "run"


def train_video(folder: Path) -> Path:
    from rs_transfer.video.run import run_train

    run_train(str(CONFIGS / "video" / "demo.yaml"), [
        f"data.root={folder / 'data'}", f"output_dir={folder / 'run'}", "train.epochs=null", "train.steps=1",
        "train.batch_size=4", "data.max_eval_videos=2", "train.warmup_steps=0"])
    return folder / "run"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """family or task -> a finished tiny run folder, trained on first use and shared by the module's tests. The
    segmentation run keeps an EMA (weights.pth then holds the EMA weights, which are what the run evaluated)."""
    trained = {}

    def get(name: str) -> Path:
        if name not in trained:
            folder = tmp_path_factory.mktemp(name)
            if name == "pretrain":
                trained[name] = train_pretrain(folder)
            elif name == "pretrain_report_best":  # picked on minival (half of train/), reported on val/
                trained[name] = train_pretrain(folder, "train.report_best=true", "data.eval_split=minival",
                                               "data.minival_fraction=0.5")
            elif name == "video":
                trained[name] = train_video(folder)
            else:
                extra = ["train.ema_decay=0.5"] if name == "pascal_seg" else []
                trained[name] = train_transfer(name, folder, *extra)
        return trained[name]

    return get


def evaluate(capsys, *argv) -> tuple[int, str, str]:
    code = main(["evaluate", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def written(out: str) -> dict:
    """The JSON whose path ends the command's summary line."""
    return json.loads(Path(out.strip().splitlines()[-1].rpartition(": ")[2]).read_text())


@pytest.mark.parametrize("name", TRANSFER_TASKS + ("pretrain", "video"))
def test_re_evaluating_a_run_with_its_own_settings_gives_its_final_metrics(name, runs, capsys):
    run = runs(name)
    final = (run / "final_metrics.json").read_bytes()
    code, out, err = evaluate(capsys, "--run", run)
    assert code == 0, err
    record = written(out)
    # Same weights, same data, same evaluator: the same numbers (float round-off allowed, none seen on CPU).
    assert record["metrics"] == pytest.approx(json.loads(final), rel=1e-6, abs=1e-9)
    assert out.splitlines()[-1].startswith(f"{name}: {record['primary_metric']} ")  # the summary line
    assert (run / "final_metrics.json").read_bytes() == final
    assert Path(out.strip().rpartition(": ")[2]).parent == run / "eval"
    config = flatten(read_yaml((run / "config.yaml").read_text(), "config.yaml"))
    assert set(EVAL_KEYS) & set(config) <= set(record["settings"])  # every evaluation key of the run, resolved
    assert all(record["settings"][key] == config[key] for key in set(EVAL_KEYS) & set(config))
    assert record["data_root"] == config["data.root"]
    assert (record["world_size"], record["device"], record["precision"]) == (1, "cpu", "none")
    assert record["weights"]["path"] == str((run / "weights.pth").resolve())
    assert record["weights"]["sha256"] == hashlib.sha256((run / "weights.pth").read_bytes()).hexdigest()
    assert record["run_git_commit"] and record["git_commit"]


def test_report_best_runs_are_re_evaluated_by_their_report_evaluator(runs, capsys):
    run = runs("pretrain_report_best")
    code, out, err = evaluate(capsys, "--run", run)
    assert code == 0, err
    assert written(out)["metrics"] == pytest.approx(json.loads((run / "final_metrics.json").read_text()), rel=1e-6)
    # without report_best, the evaluator that picked the checkpoint: minival, as the run's last evaluation event
    code, out, err = evaluate(capsys, "--run", run, "train.report_best=false")
    assert code == 0, err
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = [event for event in events if event["kind"] == "eval"][-1]
    record = written(out)
    assert record["metrics"] == pytest.approx({key: last[key] for key in record["metrics"]}, rel=1e-6)
    assert record["settings"]["train.report_best"] is False and record["settings"]["data.eval_split"] == "minival"


def test_overrides_take_evaluation_settings_only_and_each_evaluation_gets_a_new_file(runs, capsys):
    run = runs("pascal_seg")
    final = json.loads((run / "final_metrics.json").read_text())
    code, out, err = evaluate(capsys, "--run", run, "task.eval_batch_size=1", "data.num_workers=0")
    assert code == 0, err
    record = written(out)
    assert record["settings"]["task.eval_batch_size"] == 1
    assert record["overrides"] == ["task.eval_batch_size=1", "data.num_workers=0"]
    assert record["metrics"] == pytest.approx(final, rel=1e-6, abs=1e-9)  # dense evaluation is batch independent
    code, out, err = evaluate(capsys, "--run", run, "task.eval_batch_size=1")
    assert code == 0 and len(list((run / "eval").glob("*.json"))) >= 2  # same settings, same second: a new name
    for key in ("train.lr=0.5", "model.name=rs50"):
        code, out, err = evaluate(capsys, "--run", run, key)
        assert code == 2 and out == ""
        assert err.count("\n") == 1 and err.startswith(f"error: {key.partition('=')[0]} is not an evaluation setting")
    code, out, err = evaluate(capsys, "--run", run, "task.eval_batch_sise=1")
    assert code == 2 and "did you mean 'task.eval_batch_size'?" in err and err.count("\n") == 1


def test_a_folder_with_only_validation_data(runs, capsys, tmp_path):
    run = runs("pascal_seg")
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    shutil.copytree(run.parent / "data" / "VOCdevkit" / "VOC2012", voc)
    sets = voc / "ImageSets" / "Segmentation"
    for image_id in (sets / "train.txt").read_text().split():
        (voc / "JPEGImages" / f"{image_id}.jpg").unlink()
        (voc / "SegmentationClass" / f"{image_id}.png").unlink()
    (sets / "train.txt").unlink()
    code, out, err = evaluate(capsys, "--run", run, "--data", tmp_path, "task.train_split=val")
    assert code == 0, err
    record = written(out)
    assert record["data_root"] == str(tmp_path)
    assert record["metrics"] == pytest.approx(json.loads((run / "final_metrics.json").read_text()), rel=1e-6)


def test_an_unfinished_run_is_refused_and_its_checkpoint_can_be_evaluated(runs, capsys, tmp_path):
    run = shutil.copytree(runs("pascal_seg"), tmp_path / "run")
    (run / "weights.pth").unlink()
    code, out, err = evaluate(capsys, "--run", run)
    assert code == 2 and "has no weights.pth" in err and "--checkpoint" in err and "--resume" in err
    # best.pt is the last (only) evaluation's checkpoint: its EMA weights are the ones weights.pth held
    code, out, err = evaluate(capsys, "--run", run, "--checkpoint", run / "checkpoints" / "best.pt")
    assert code == 0, err
    record = written(out)
    assert record["weights"]["path"] == str((run / "checkpoints" / "best.pt").resolve())
    assert record["metrics"] == pytest.approx(json.loads((run / "final_metrics.json").read_text()), rel=1e-6)


def test_out_is_a_file_or_a_folder_and_never_one_of_the_runs_files(runs, capsys, tmp_path, monkeypatch):
    run = runs("nyu_depth")
    final = (run / "final_metrics.json").read_bytes()
    code, out, err = evaluate(capsys, "--run", run, "--out", tmp_path / "mine.json")
    assert code == 0 and out.rstrip().endswith(str(tmp_path / "mine.json"))
    assert json.loads((tmp_path / "mine.json").read_text())["task"] == "nyu_depth"
    code, out, err = evaluate(capsys, "--run", run, "--out", tmp_path)  # a folder: a new name inside it
    assert code == 0 and Path(out.rstrip().rpartition(": ")[2]).parent == tmp_path
    for own in (run / "final_metrics.json", run / "checkpoints" / "best.pt"):
        code, out, err = evaluate(capsys, "--run", run, "--out", own)
        assert code == 2 and "is a file of the run itself" in err
    assert (run / "final_metrics.json").read_bytes() == final
    code, out, err = evaluate(capsys, "--run", run, "--out", tmp_path / "a\nb.json")
    assert code == 2 and "holds a control character" in err and not list(tmp_path.glob("a*"))
    # A file where the JSON's folder must be fails before the evaluation (which can take hours), not after it.
    def not_now(*args):
        raise AssertionError("evaluated although --out cannot be written")

    monkeypatch.setattr(rs_transfer.evaluate, "evaluated_as_the_engine_does", not_now)
    for out in (run / "weights.pth" / "x.json", run / "weights.pth" / "sub" / "x.json"):
        code, _, err = evaluate(capsys, "--run", run, "--out", out)
        assert (code, err) == (2, f"error: cannot create evaluation folder {out.parent}: {run / 'weights.pth'} is a "
                                  "file, not a folder\n")
    assert not (run / "weights.pth").is_dir()


def test_a_demo_runs_data_are_never_generated_for_an_evaluation(runs, capsys, tmp_path):
    run = runs("video")  # trained with data.synthetic: true
    code, out, err = evaluate(capsys, "--run", run, "--data", tmp_path / "none", "data.eval_views=1")
    assert code == 2 and err.startswith("error: video data root not found") and not (tmp_path / "none").exists()
    code, out, err = evaluate(capsys, "--run", run, "data.synthetic=true")
    assert code == 2 and "data.synthetic is not an evaluation setting" in err

