"""Your own videos: the SlowFast / mmaction2 `path label` list layout (video/lists.py) and class folders with any
class names, read from tiny files in the real layouts; one short `video train` on a list whose class names then
travel with the run to `predict` (without the data) and `export`."""

import json
import logging
import shutil

import pytest

from engine_toy import CONFIGS
from rs_transfer.cli import main
from rs_transfer.config import ConfigError, load_config
from rs_transfer.errors import DataError
from rs_transfer.video import data, lists, synthetic
from rs_transfer.video.config import VideoConfig
from rs_transfer.video.task import build_task, class_names, prepare_root

# Three classes, none of Kinetics', with spaces and non-ASCII characters; sorted: "to the right", "à gauche ←",
# "下へ".
OWN_CLASSES = {"à gauche ←": (0, -1), "to the right": (0, 1), "下へ": (1, 0)}
NAMES = sorted(OWN_CLASSES)
TINY = ["model.name=rs26-w0.125", "data.num_workers=0", "data.clip_frames=4", "data.crop_size=32",
        "data.train_short_side=32", "data.eval_short_side=32", "data.eval_crop_size=32", "data.eval_views=1",
        "train.device=cpu", "train.amp=none", "train.channels_last=false"]


def touch(root, *names):
    """Empty files standing for videos: the list readers only check that a listed video exists."""
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"")
    return root


def write(path, text, encoding="utf-8"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A `video train` run of configs/video/demo_list.yaml (few steps) on a generated list of OWN_CLASSES."""
    tmp = tmp_path_factory.mktemp("own_list")
    root = synthetic.write_dataset(tmp / "data", "list", {"train": 2, "val": 1}, num_frames=8, classes=OWN_CLASSES)
    run = tmp / "run"
    code = main(["video", "train", "--config", str(CONFIGS / "video" / "demo_list.yaml"), f"data.root={root}",
                 f"output_dir={run}", "train.epochs=null", "train.steps=2", "train.batch_size=3",
                 "train.warmup_steps=0", "data.eval_views=1"])
    assert code == 0
    return root, run


def test_a_list_run_saves_its_class_names_and_predict_names_them_without_the_data(trained, tmp_path, capsys):
    root, run = trained
    assert json.loads((run / "final_metrics.json").read_text())["videos"] == 3
    config = load_config(VideoConfig, run / "config.yaml")
    assert config.data.class_names == NAMES and config.model.num_classes == 3
    videos = tmp_path / "videos"
    shutil.copytree(root / "videos" / "val", videos)
    shutil.move(root, tmp_path / "moved")  # predict reads the run alone
    assert main(["predict", "--run", str(run), "--images", str(videos), "--out", str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert summary["class_names"] == "data.class_names of the run's config"
    assert len(summary["predictions"]) == 3
    for record in summary["predictions"]:
        assert [c["class"] for c in record["top5"]] == [NAMES[c["index"]] for c in record["top5"]]
        assert sorted(c["class"] for c in record["top5"]) == NAMES
    capsys.readouterr()
    assert main(["export", "--run", str(run), "--format", "torchscript"]) == 0
    assert json.loads(capsys.readouterr().out)["max_abs_diff"] <= 1e-4
    assert (run / "export" / "model.ts").is_file()


def test_predict_on_a_run_saved_without_class_names_reads_them_from_the_data(tmp_path):
    root = synthetic.write_dataset(tmp_path / "data", "list", {"train": 1, "val": 1}, num_frames=4,
                                   classes=OWN_CLASSES)
    config = load_config(VideoConfig, None, [f"data.root={root}", "model.num_classes=3"])
    assert class_names(config) == (tuple(NAMES), f"the training classes of {root}")
    config.model.num_classes = 5
    assert class_names(config)[0] is None and "5 outputs" in class_names(config)[1]
    config.data.root = str(tmp_path / "gone")
    assert class_names(config)[0] is None


def test_class_folders_with_any_names_and_count(tmp_path):
    root = synthetic.write_dataset(tmp_path / "mine", "folders", {"train": 2, "val": 1}, num_frames=4,
                                   classes=OWN_CLASSES)
    assert data.find_layout(root) == "folders"
    videos, classes = data.list_splits(root)
    assert classes == NAMES
    for split in ("train", "val"):
        assert sorted({v.label for v in videos[split]}) == [0, 1, 2]
        assert all(v.path.parent.name == NAMES[v.label] for v in videos[split])
    config = load_config(VideoConfig, None, [f"data.root={root}", *TINY])
    build_task(config)
    assert config.data.class_names == NAMES and config.model.num_classes == 3
    config = load_config(VideoConfig, None, [f"data.root={root}", *TINY, "data.class_names=[a,b,c]"])
    with pytest.raises(ConfigError, match=r"data.class_names \(3 names\) disagrees with the 3 classes of .*mine: "
                                          r"class 0 is 'a' in data.class_names, 'to the right' in the data"):
        build_task(config)


def test_the_list_demo_is_the_folder_demo_listed(tmp_path):
    folders = prepare_root(load_config(VideoConfig, "video/demo.yaml", [f"data.root={tmp_path / 'f'}"]))
    listed = prepare_root(load_config(VideoConfig, "video/demo_list.yaml", [f"data.root={tmp_path / 'l'}"]))
    assert data.find_layout(listed) == "list" and (listed / "classes.txt").is_file()
    first = (listed / "train.csv").read_text().splitlines()[0]
    assert first == "videos/train/moving down/train_0000.mp4 0"  # SlowFast's: space separated, spaces in the path
    by_folder, by_list = data.list_splits(folders), data.list_splits(listed)
    assert by_list[1] == by_folder[1] == sorted(synthetic.DIRECTIONS)
    for split in ("train", "val"):
        assert [(v.path.relative_to(listed / "videos"), v.label) for v in by_list[0][split]] == [
            (v.path.relative_to(folders), v.label) for v in by_folder[0][split]]
        assert all(a.path.read_bytes() == b.path.read_bytes() for a, b in zip(by_list[0][split], by_folder[0][split]))


@pytest.mark.parametrize("line,expected", [
    ("a/b.mp4 3", ("a/b.mp4", "3")),
    ("a/b.mp4\t3", ("a/b.mp4", "3")),
    ("my videos/clip one.mp4 12", ("my videos/clip one.mp4", "12")),
    ("a/b.mp4,3", ("a/b.mp4", "3")),
    ("a/b.mp4, moving up", ("a/b.mp4", "moving up")),
    ("a, b/c.mp4,dog", ("a, b/c.mp4", "dog")),
    ("lonely.mp4", ("", "")),
])
def test_the_label_is_the_last_field(line, expected):
    assert lists.split_line(line) == expected


def test_list_formats_integer_labels_names_file_bom_crlf_header_absolute_paths(tmp_path):
    root = touch(tmp_path, "v/a 1.mp4", "v/b.mp4", "v/c.mp4", "v/d.mp4")
    outside = touch(tmp_path / "elsewhere", "e.mp4") / "e.mp4"
    write(root / "train.txt", f"\ufeffpath,label\r\nv/a 1.mp4,2\r\n\r\nv/b.mp4 0\r\n{outside} 1\r\n")
    write(root / "val.txt", "v/c.mp4 2\nv/d.mp4\t0\n")
    videos, classes = data.list_splits(root)
    assert classes == ["0", "1", "2"]  # no names file: the indices as text, up to the largest training label
    assert [(v.path, v.label) for v in videos["train"]] == [(root / "v/a 1.mp4", 2), (root / "v/b.mp4", 0),
                                                            (outside, 1)]
    assert [v.label for v in videos["val"]] == [2, 0]
    write(root / "classes.txt", "\ufeffcat\r\ndog\r\nsmall bird\r\n\r\n")
    assert data.list_splits(root)[1] == ["cat", "dog", "small bird"]
    write(root / "ids.json", json.dumps({"dog": 1, "small bird": 2, "cat": 0}))  # SlowFast's classids.json
    assert data.list_splits(root, names_file="ids.json")[1] == ["cat", "dog", "small bird"]


def test_name_labels_without_a_names_file_are_sorted_and_a_names_file_orders_them(tmp_path):
    root = touch(tmp_path, "1.mp4", "2.mp4", "3.mp4")
    write(root / "train.csv", "1.mp4,zebra crossing\n2.mp4,apple\n")
    write(root / "val.csv", "3.mp4,zebra crossing\n")
    videos, classes = data.list_splits(root)
    assert classes == ["apple", "zebra crossing"] and [v.label for v in videos["train"]] == [1, 0]
    write(root / "classes.txt", "zebra crossing\nunseen\napple\n")
    videos, classes = data.list_splits(root)
    assert classes == ["zebra crossing", "unseen", "apple"] and [v.label for v in videos["train"]] == [0, 2]


def test_explicit_list_files_are_relative_to_the_root(tmp_path):
    root = touch(tmp_path, "x.mp4", "y.mp4")
    write(root / "splits" / "trainlist01.txt", "x.mp4 0\ny.mp4 1\n")
    write(root / "splits" / "testlist01.txt", "y.mp4 1\n")
    list_files = {"train": "splits/trainlist01.txt", "val": "splits/testlist01.txt"}
    assert data.find_layout(root, list_files) == "list"
    videos, classes = data.list_splits(root, list_files=list_files)
    assert len(videos["train"]) == 2 and classes == ["0", "1"]
    with pytest.raises(DataError, match=r"video list not found: .*splits/nope.txt \(data.val_list"):
        data.list_splits(root, list_files={"train": "splits/trainlist01.txt", "val": "splits/nope.txt"})


def test_a_few_missing_videos_are_left_out_and_most_missing_is_an_error_naming_the_first(tmp_path, caplog):
    root = touch(tmp_path, "a.mp4", "b.mp4", "c.mp4")
    write(root / "train.csv", "a.mp4 0\nb.mp4 1\ngone.mp4 1\nc.mp4 0\n")
    write(root / "val.csv", "a.mp4 0\n")
    with caplog.at_level(logging.WARNING):
        videos, _ = data.list_splits(root)
    assert [v.path.name for v in videos["train"]] == ["a.mp4", "b.mp4", "c.mp4"]
    assert (f"{root / 'train.csv'}: 1 of 4 listed videos are missing and left out (the first: {root / 'gone.mp4'}, "
            "line 3)") in caplog.text
    write(root / "val.csv", "k400/a.mp4 0\nk400/b.mp4 1\n")  # a root one folder too high
    with pytest.raises(DataError, match=rf"{root / 'val.csv'}, line 1: video not found: {root / 'k400/a.mp4'} \(2 of "
                                        r"the 2 listed videos are missing: paths are relative to data.root="):
        data.list_splits(root)


ERRORS = [
    # (train.csv, val.csv, classes.txt or None, message (regex, after the root), file named)
    ("a.mp4 0\nb.mp4\n", "a.mp4 0\n", None, r"train.csv, line 2: expected `path label`", "train.csv"),
    ("a.mp4 0\nb.mp4 3\n", "a.mp4 0\n", "x\ny\nz\n", r"train.csv, line 2: label 3 is out of range \(0 to 2\): .*"
     r"classes.txt names 3 classes", "train.csv"),
    ("a.mp4 -1\nb.mp4 0\n", "a.mp4 0\n", None, r"train.csv, line 1: label -1 is out of range", "train.csv"),
    ("a.mp4 0\nb.mp4 dog\n", "a.mp4 0\n", None, r"train.csv, line 2: label 'dog' is not an integer but .*train.csv, "
     r"line 1 has '0'", "train.csv"),
    ("a.mp4 0\nb.mp4 dog\n", "a.mp4 0\n", "cat\nmouse\n", r"train.csv, line 2: class 'dog' is not one of the 2 "
     r"names in .*classes.txt", "train.csv"),
    ("a.mp4 0\nb.mp4 1\n", "a.mp4 0\nb.mp4 2\n", None, r"val.csv, line 2: label 2 is out of range \(0 to 1\): the "
     r"labels of .*train.csv go up to 1", "val.csv"),
    ("a.mp4,cat\nb.mp4,dog\n", "a.mp4,cow\n", None, r"val.csv, line 1: class 'cow' has no training videos in "
     r".*train.csv", "val.csv"),
    ("a.mp4 0\n", "a.mp4 0\n", "cat\n\ndog\n", r"classes.txt, line 2 is blank", "classes.txt"),
    ("a.mp4 0\n", "a.mp4 0\n", "cat\ndog\ncat\n", r"classes.txt: class 'cat' is named twice \(entries 1 and 3\)",
     "classes.txt"),
    ("label,youtube_id,time_start,time_end,split\n", "a.mp4 0\n", None, r"train.csv is Kinetics' annotation CSV",
     "train.csv"),
    ("", "a.mp4 0\n", None, r"train.csv lists no videos", "train.csv"),
    # a path with a space and no label: "take 0.mp4" is no class name
    ("a.mp4,cat\nclips/down move/take 0.mp4\n", "a.mp4,cat\n", None, r"train.csv, line 2: expected `path label`",
     "train.csv"),
]


@pytest.mark.parametrize("train,val,names,message,named", ERRORS, ids=[
    "malformed", "out-of-range", "negative", "mixed", "unknown-name", "val-beyond-train", "val-unknown-name",
    "names-blank-line", "names-twice", "kinetics-csv", "empty", "no-label-space-in-path"])
def test_list_errors_name_the_file_and_line(tmp_path, train, val, names, message, named):
    root = touch(tmp_path, "a.mp4", "b.mp4")
    write(root / "train.csv", train)
    write(root / "val.csv", val)
    if names is not None:
        write(root / "classes.txt", names)
    with pytest.raises(DataError, match=message) as error:
        data.list_splits(root)
    assert str(root / named) in str(error.value)


def test_layout_errors(tmp_path):
    root = touch(tmp_path, "a.mp4")
    write(root / "train.csv", "a.mp4 0\n")
    with pytest.raises(DataError, match=r"video list of the val split not found: expected .*val.csv or .*val.txt"):
        data.list_splits(root)
    write(root / "train.txt", "a.mp4 0\n")
    with pytest.raises(DataError, match=r"train.csv and .*train.txt are both video lists of the train split"):
        data.find_layout(root)
    folders = synthetic.write_dataset(tmp_path / "folders", "folders", {"train": 1, "val": 1}, num_frames=2)
    with pytest.raises(DataError, match="data.class_names_file=classes.txt names the classes of a `path label` list"):
        data.list_splits(folders, names_file="classes.txt")
    write(root / "names.json", '{"cat": 0, "dog": 2}')
    with pytest.raises(DataError, match=r"names.json: the class indices must be 0 to 1, each once"):
        lists.read_class_names(root / "names.json")
    write(root / "latin1.txt", "caf\xe9\n", encoding="latin-1")
    with pytest.raises(DataError, match=r"cannot read class names file .*latin1.txt: UnicodeDecodeError"):
        lists.read_class_names(root / "latin1.txt")


def test_video_train_on_a_bad_list_is_one_error_line(tmp_path, capsys):
    root = touch(tmp_path / "data", "a.mp4")
    write(root / "train.csv", "a.mp4 0\na.mp4 zero\n")
    write(root / "val.csv", "a.mp4 0\n")
    code = main(["video", "train", "--config", str(CONFIGS / "video" / "demo_list.yaml"), f"data.root={root}",
                 f"output_dir={tmp_path / 'run'}"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: {root / 'train.csv'}, line 2: label 'zero' is not an integer")
    assert not any("Traceback" in line for line in err)


def test_warns_of_classes_no_training_video_teaches(tmp_path, caplog):
    root = touch(tmp_path, "a.mp4", "b.mp4")
    write(root / "train.txt", "a.mp4 1\nb.mp4 2\n")  # UCF-101's own lists count from 1
    write(root / "val.txt", "a.mp4 1\n")
    with caplog.at_level(logging.WARNING):
        _, classes = data.list_splits(root)
    assert classes == ["0", "1", "2"]
    assert "1 of 3 classes have no training video, the first '0' (labels counted from 1?" in caplog.text
