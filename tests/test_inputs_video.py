"""Video inputs as real copies of Kinetics ship them: mixed containers in the CSV layout, an annotation file with a
byte-order mark, files cut short whose header still declares every frame, empty class folders, and a class count
left for the data to decide."""

import logging
import random
from collections import Counter

import av
import numpy as np
import pytest
import torch
import yaml

from rs_transfer.config import ConfigError, load_config
from rs_transfer.video import data, sampling, synthetic
from rs_transfer.engine.classification import Classifier
from rs_transfer.video.config import VideoConfig, VideoDataConfig
from rs_transfer.video.run import run_eval
from rs_transfer.video.task import EvalVideos, build_net, build_task, evaluate_videos

CLASSES = sorted(synthetic.DIRECTIONS)
TINY = ["model.name=rs26-w0.125", "data.num_workers=0", "data.clip_frames=8", "data.crop_size=32",
        "data.train_short_side=32", "data.eval_short_side=32", "data.eval_crop_size=32", "data.eval_views=3"]


def _cut_video(path, declared: int, decodable: int):
    """A real H.264 MP4 of `declared` frames cut inside packet `decodable`: the header still declares every frame,
    only the first `decodable` packets are whole."""
    synthetic.write_video(path, synthetic.moving_square((0, 1), declared, 32, np.random.default_rng(0)))
    with av.open(str(path)) as container:
        packets = [p for p in container.demux(video=0) if p.size]
        cut = packets[decodable].pos + packets[decodable].size // 2
    path.write_bytes(path.read_bytes()[:cut])
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == declared
        decoded = 0
        with pytest.raises(av.FFmpegError):  # plain PyAV decoding stops at the cut packet with an error
            for _ in container.decode(video=0):
                decoded += 1
        assert decoded <= decodable
    return path


def test_csv_layout_finds_clips_in_every_container(tmp_path, caplog):
    root = synthetic.write_dataset(tmp_path / "k400", "csv", {"train": 3, "val": 1}, num_frames=12,
                                   suffixes=(".mp4", ".mkv", ".webm"))
    csv_path = root / "annotations" / "train.csv"
    # A row whose only file is not a video (a partial download) stays missing.
    (root / "train" / "gone1234567_000005_000015.part").write_bytes(b"partial")
    csv_path.write_text(csv_path.read_text() + "moving up,gone1234567,5,15,train\n")
    with caplog.at_level(logging.INFO):
        train, classes = data.list_videos(root, "train")
    assert classes == CLASSES
    assert len(train) == 12
    assert Counter(v.path.suffix for v in train) == {".mp4": 4, ".mkv": 4, ".webm": 4}
    for video in train:
        assert video.path.is_file() and CLASSES[video.label].split()[-1] in video.path.name
    assert "1 of 13 listed videos are missing" in caplog.text
    clips = data.TrainClips(train, clip_frames=4, frame_stride=2,
                            augment=sampling.TrainAugment(32, scale_jitter=False, short_side=32, flip=False))
    for index in range(3):  # one video of each container decodes
        clip, label = clips[index]
        assert clip.shape == (3, 4, 32, 32) and label == train[index].label
    assert clips.skipped.count == 0


def test_csv_layout_prefers_mp4_when_a_clip_has_two_containers(tmp_path):
    root = synthetic.write_dataset(tmp_path / "k400", "csv", {"train": 1, "val": 1}, num_frames=4,
                                   suffixes=(".webm",))
    first = sorted((root / "train").iterdir())[0]
    synthetic.write_video(first.with_suffix(".mp4"), synthetic.moving_square((0, 1), 4, 32, np.random.default_rng(0)))
    train, _ = data.list_videos(root, "train")
    assert sorted(v.path.suffix for v in train) == [".mp4", ".webm", ".webm", ".webm"]


def test_csv_annotations_with_a_byte_order_mark(tmp_path):
    root = synthetic.write_dataset(tmp_path / "k400", "csv", {"train": 1, "val": 1}, num_frames=4)
    csv_path = root / "annotations" / "train.csv"
    lines = csv_path.read_text().splitlines()
    csv_path.write_bytes(("\ufeff" + "\r\n".join(lines) + "\r\n").encode("utf-8"))  # as Excel saves it
    train, classes = data.list_videos(root, "train")
    assert classes == CLASSES and len(train) == 4
    assert [CLASSES[v.label] for v in train] == [line.split(",")[0] for line in lines[1:]]


def test_cut_video_is_counted_by_its_whole_frames(tmp_path):
    path = _cut_video(tmp_path / "cut.mp4", declared=60, decodable=33)
    assert data.count_frames(path) == 33
    frames = data.decode_frames(path, [0, 32])
    assert sorted(frames) == [0, 32] and frames[32].shape == (32, 32, 3)
    with pytest.raises(data.UnreadableVideo, match="ends early"):
        data.decode_frames(path, [33])


def test_cut_video_is_evaluated_over_the_frames_that_decode(tmp_path):
    path = _cut_video(tmp_path / "cut.mp4", declared=60, decodable=33)
    d = VideoDataConfig(num_workers=0, clip_frames=8, frame_stride=2, eval_short_side=32, eval_crop_size=32,
                        eval_views=30)
    item = EvalVideos([data.Video(path, 1)], d)[0]
    assert "error" not in item
    assert item["num_frames"] == 33 and item["label"] == 1
    assert sorted(item["frames"]) == sampling.eval_frame_indices(33, 8, 2, 10)
    assert max(item["frames"]) == 32  # the last clip ends on the last whole frame

    class Counting(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bias = torch.nn.Parameter(torch.tensor([0.0, 1.0, 0.0, 0.0]))
            self.views = 0

        def forward(self, x):
            self.views += x.shape[0]
            return self.bias.expand(x.shape[0], -1)

    net = Counting()
    metrics = evaluate_videos(Classifier(net).eval(), [data.Video(path, 1)], d, 4)
    assert metrics == {"top1": 1.0, "top5": 1.0, "videos": 1.0, "skipped": 0.0}
    assert net.views == 30


def test_cut_video_gives_training_clips_and_a_true_length(tmp_path):
    path = _cut_video(tmp_path / "cut.mp4", declared=60, decodable=33)
    clips = data.TrainClips([data.Video(path, 2)], clip_frames=8, frame_stride=2,
                            augment=sampling.TrainAugment(32, scale_jitter=False, short_side=32))
    random.seed(0)
    for _ in range(20):
        clip, label = clips[0]
        assert clip.shape == (3, 8, 32, 32) and label == 2
    assert clips.skipped.count == 0
    short = _cut_video(tmp_path / "short.mp4", declared=60, decodable=5)
    with pytest.raises(data.UnreadableVideo, match="too short: 5 frames, a clip needs 8"):
        clips.load_clip(short)


def test_reordered_frames_are_all_decoded(tmp_path):
    # Real Kinetics H.264 has B-frames: the decoder holds frames back, and counting packets only works if decoding
    # flushes them at the end, also when a cut file ends before the demuxer's own flush.
    path = tmp_path / "bframes.mp4"
    frames = synthetic.moving_square((1, 0), 40, 32, np.random.default_rng(0))
    with av.open(str(path), mode="w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=25)
        stream.height, stream.width, stream.pix_fmt = 32, 32, "yuv420p"
        stream.options = {"preset": "medium", "bf": "3"}
        for image in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
    with av.open(str(path)) as container:
        assert container.streams.video[0].codec_context.has_b_frames
        packets = [p for p in container.demux(video=0) if p.size]
        cut = packets[25].pos + packets[25].size // 2
    assert data.count_frames(path) == 40 and sorted(data.decode_frames(path, [0, 39])) == [0, 39]
    path.write_bytes(path.read_bytes()[:cut])
    assert data.count_frames(path) == 25 and sorted(data.decode_frames(path, [24])) == [24]


def test_empty_class_folders_are_named(tmp_path, caplog):
    root = synthetic.write_dataset(tmp_path / "k400", "folders", {"train": 1, "val": 1}, num_frames=4)
    (root / "train" / "moving sideways").mkdir()
    (root / "train" / "moving sideways" / "notes.txt").write_text("no videos here")
    empty_val = root / "val" / "moving up"
    for video in empty_val.iterdir():
        video.unlink()
    with caplog.at_level(logging.WARNING):
        val, classes = data.list_videos(root, "val")
    assert classes == sorted([*CLASSES, "moving sideways"])  # kept: see the test below
    assert len(val) == 3
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert str(root / "train" / "moving sideways") in warnings[0] and "keeps its output" in warnings[0]
    assert str(empty_val) in warnings[1] and "nothing of the class is evaluated" in warnings[1]


def test_an_empty_training_class_folder_keeps_its_index_so_later_classes_do_not_shift(tmp_path):
    root = synthetic.write_dataset(tmp_path / "k400", "folders", {"train": 1, "val": 1}, num_frames=8)
    (root / "train" / "moving nowhere").mkdir()  # sorts between "moving left" and "moving right"
    (root / "train" / ".ipynb_checkpoints").mkdir()  # hidden: not a class
    expected = ["moving down", "moving left", "moving nowhere", "moving right", "moving up"]
    videos, classes = data.list_splits(root)
    assert classes == expected
    for split in ("train", "val"):
        assert sorted((expected[v.label], v.path.parent.name) for v in videos[split]) == [
            (name, name) for name in expected if name != "moving nowhere"]
    assert {v.label for v in videos["val"]} == {0, 1, 3, 4}
    config = load_config(VideoConfig, None, [f"data.root={root}", *TINY])
    task = build_task(config)
    assert config.model.num_classes == 5 and task.model.net.fc.out_features == 5


@pytest.mark.parametrize("layout", ["folders", "csv"])
def test_class_count_comes_from_the_training_split(tmp_path, layout):
    root = synthetic.write_dataset(tmp_path / "k400", layout, {"train": 1, "val": 1}, num_frames=8,
                                   classes=("moving left", "moving right", "moving up"))
    config = load_config(VideoConfig, None, [f"data.root={root}", *TINY])
    assert config.model.num_classes is None
    task = build_task(config)
    assert config.model.num_classes == 3
    assert task.model.net.fc.out_features == 3
    wrong = load_config(VideoConfig, None, [f"data.root={root}", "model.num_classes=400", *TINY])
    with pytest.raises(ConfigError, match="model.num_classes=400 but .* has 3 training classes"):
        build_task(wrong)


def test_eval_infers_the_class_count_too(tmp_path):
    root = synthetic.write_dataset(tmp_path / "k400", "folders", {"train": 1, "val": 1}, num_frames=8)
    config_path = tmp_path / "run.yaml"
    config_path.write_text(yaml.safe_dump({"model": {"name": "rs26-w0.125"}, "data": {"root": str(root)},
                                           "train": {"device": "cpu"}, "output_dir": str(tmp_path / "out")}))
    config = load_config(VideoConfig, config_path, TINY[1:])
    config.model.num_classes = 4
    torch.save({"model": Classifier(build_net(config)).state_dict()}, tmp_path / "final.pt")
    metrics = run_eval(str(tmp_path / "final.pt"), 3, str(config_path), TINY[1:])
    assert metrics["videos"] == 4.0 and metrics["skipped"] == 0.0 and metrics["views"] == 3
