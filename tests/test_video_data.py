"""Kinetics layouts, PyAV decoding, clip sampling, scale jittering and the 30-view sampler, on tiny videos written
with PyAV in both on-disk layouts."""

import logging

import numpy as np
import pytest
import torch
from torchvision import tv_tensors

from rs_transfer.errors import DataError
from rs_transfer.video import data, sampling, synthetic
from rs_transfer.video.data import UnreadableVideo

CLASSES = sorted(synthetic.DIRECTIONS)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("k400")
    counts = {"train": 2, "val": 1}
    return {
        layout: synthetic.write_dataset(root / layout, layout, counts, num_frames=20, size=32)
        for layout in ("folders", "csv")
    }


@pytest.mark.parametrize("layout", ["folders", "csv"])
def test_both_layouts_list_the_same_classes(datasets, layout):
    root = datasets[layout]
    assert data.find_layout(root) == layout
    train, classes = data.list_videos(root, "train")
    val, _ = data.list_videos(root, "val")
    assert classes == CLASSES
    assert len(train) == 8 and len(val) == 4
    assert sorted(v.label for v in train) == [0, 0, 1, 1, 2, 2, 3, 3]
    for video in train:
        assert CLASSES[video.label].split()[-1] in str(video.path)


def test_csv_layout_files_and_missing_videos(datasets, tmp_path, caplog):
    root = datasets["csv"]
    names = sorted(p.name for p in (root / "train").iterdir())
    assert names[0] == "downtrain00_000000_000010.mp4"  # <youtube_id>_<start:06d>_<end:06d>.mp4
    lines = (root / "annotations" / "train.csv").read_text().splitlines()
    assert lines[0] == "label,youtube_id,time_start,time_end,split"
    copy = tmp_path / "k400"
    (copy / "annotations").mkdir(parents=True)
    (copy / "annotations" / "train.csv").write_text("\n".join(lines + ["moving up,gone1234567,5,15,train"]) + "\n")
    (copy / "train").symlink_to(root / "train")
    with caplog.at_level(logging.INFO):
        videos, _ = data.list_videos(copy, "train")
    assert len(videos) == 8
    assert "1 of 9 listed videos are missing" in caplog.text
    with pytest.raises(DataError, match="annotations/val.csv"):
        data.list_videos(copy, "val")


def test_a_csv_class_whose_videos_are_all_missing_keeps_its_index(datasets, tmp_path, caplog):
    # a Kinetics copy without any video of one class: the classes are the CSV's, so later classes do not shift
    root = datasets["csv"]
    copy = tmp_path / "k400"
    (copy / "annotations").mkdir(parents=True)
    (copy / "train").mkdir()
    (copy / "annotations" / "train.csv").write_text((root / "annotations" / "train.csv").read_text())
    for video in (root / "train").iterdir():
        if not video.name.startswith("down"):  # "moving down" (class 0) lost every video
            (copy / "train" / video.name).symlink_to(video)
    with caplog.at_level(logging.WARNING):
        videos, classes = data.list_videos(copy, "train")
    assert classes == CLASSES and sorted(v.label for v in videos) == [1, 1, 2, 2, 3, 3]
    assert "1 of the 4 classes of" in caplog.text and "'moving down'" in caplog.text


def test_bad_roots_name_the_path(tmp_path):
    with pytest.raises(DataError, match="not found"):
        data.find_layout(tmp_path / "nowhere")
    with pytest.raises(DataError, match="holds no video layout"):
        data.find_layout(tmp_path)


def test_decoding_returns_the_written_frames(tmp_path):
    frames = synthetic.moving_square((0, 1), 12, 32, np.random.default_rng(0))
    path = tmp_path / "clip.mp4"
    synthetic.write_video(path, frames)
    assert data.count_frames(path) == 12
    decoded = data.decode_frames(path, [0, 5, 11])
    assert sorted(decoded) == [0, 5, 11]

    def blocks(frame):  # grey 4x4 block means: H.264 (yuv420) keeps these, not the per-pixel colour noise
        return frame.astype(float).mean(-1).reshape(8, 4, 8, 4).mean((1, 3))

    for i in (0, 5, 11):
        assert decoded[i].shape == (32, 32, 3) and decoded[i].dtype == np.uint8
        assert np.abs(blocks(decoded[i]) - blocks(frames[i])).mean() < 4  # measured: about 1.3
    assert np.abs(blocks(decoded[5]) - blocks(frames[0])).mean() > 10  # another frame: about 25
    resized = data.decode_frames(path, [3], short_side=16)
    assert resized[3].shape == (16, 16, 3)
    with pytest.raises(UnreadableVideo, match="ends early"):
        data.decode_frames(path, [12])


def test_unreadable_and_short_videos_are_skipped_by_name(datasets, tmp_path, caplog):
    videos, _ = data.list_videos(datasets["folders"], "train")
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video at all" * 10)
    short = tmp_path / "short.mp4"
    synthetic.write_video(short, synthetic.moving_square((1, 0), 4, 32, np.random.default_rng(1)))
    clips = data.TrainClips([data.Video(broken, 3), data.Video(short, 3), videos[0]], clip_frames=8, frame_stride=2,
                            augment=sampling.TrainAugment(32, scale_jitter=False, short_side=32))
    with caplog.at_level(logging.WARNING):
        clip, label = clips[0]
    assert clip.shape == (3, 8, 32, 32) and clip.dtype == torch.uint8  # the model normalises on its device
    assert label == videos[0].label  # the first readable video after the two bad ones
    assert clips.skipped.count == 2
    assert f"skipping video {broken}" in caplog.text
    assert f"skipping video {short}: too short: 4 frames" in caplog.text


def test_clips_longer_than_every_video_say_so_not_unreadable(datasets):
    videos, _ = data.list_videos(datasets["folders"], "train")  # 20 frames each
    clips = data.TrainClips(videos, clip_frames=32, frame_stride=2, max_tries=3,
                            augment=sampling.TrainAugment(32, scale_jitter=False, short_side=32))
    with pytest.raises(DataError, match=r"3 videos in a row from .* on are shorter than a clip \(20 frames, a clip "
                                        r"needs 32\): lower data.clip_frames"):
        clips[0]


def test_training_clip_indices():
    assert sampling.clip_span(32, 2) == 63
    assert sampling.clip_indices(10, 4, 2, 100) == [10, 12, 14, 16]
    assert sampling.clip_indices(0, 4, 2, 5) == [0, 2, 4, 4]  # shorter than the span: the last frame repeats
    starts = {sampling.random_clip_start(100, 32, 2) for _ in range(300)}
    assert min(starts) >= 0 and max(starts) <= 37 and len(starts) > 20


def test_thirty_view_sampler_exact_starts_and_crops():
    # 300 frames, 32 frames at stride 2 (a span of 63): max_offset 237, linspace(0, 237, 10) truncated.
    starts = sampling.eval_clip_starts(300, 32, 2, 10)
    assert starts == [0, 26, 52, 79, 105, 131, 158, 184, 210, 237]
    assert sampling.clip_indices(starts[-1], 32, 2, 300)[-1] == 299  # the last clip reaches the last frame
    assert sampling.eval_clip_starts(50, 32, 2, 10) == [0] * 10  # shorter than a span: every clip at 0
    assert sampling.eval_clip_starts(300, 32, 2, 1) == [118]  # one clip: the centre
    # 340x256 video -> short side 256 gives 256x340; crops of 256 at the start, centre and end of the width.
    assert sampling.short_side_size(256, 340, 256) == (256, 340)
    assert sampling.short_side_size(720, 1280, 256) == (256, 455)
    assert sampling.crop_offsets(256, 455, 256, 3) == [(0, 0), (0, 99), (0, 199)]
    assert sampling.crop_offsets(455, 256, 256, 3) == [(0, 0), (99, 0), (199, 0)]
    assert sampling.crop_offsets(256, 455, 256, 1) == [(0, 99)]
    assert sampling.views_for(30) == (10, 3) and sampling.views_for(3) == (1, 3) and sampling.views_for(1) == (1, 1)


def test_eval_views_cut_the_right_frames_and_pixels():
    # Frame i has value i everywhere, plus a column ramp in the green channel, so a view tells where it came from.
    num_frames, height, width = 40, 8, 14
    frames = {}
    for i in range(num_frames):
        frame = np.full((height, width, 3), i, dtype=np.uint8)
        frame[..., 1] = np.arange(width, dtype=np.uint8) * 10
        frames[i] = frame
    views = list(sampling.eval_views(frames, num_frames, clip_frames=4, frame_stride=2, num_clips=10, num_crops=3,
                                     crop_size=8))
    assert len(views) == 30 and views[0].shape == (3, 4, 8, 8) and views[0].dtype == torch.uint8

    def pixel(view, channel, t, x):
        return view[channel, t, 0, x].item()

    starts = sampling.eval_clip_starts(num_frames, 4, 2, 10)
    for clip in range(10):
        for crop, left in enumerate((0, 3, 6)):
            view = views[3 * clip + crop]
            assert [pixel(view, 0, t, 0) for t in range(4)] == [starts[clip] + 2 * t for t in range(4)]
            assert pixel(view, 1, 0, 0) == 10 * left


def test_scale_jitter_bounds():
    height, width = 240, 320
    augment = sampling.TrainAugment(24, scale_jitter=True, area=(0.08, 1.0), aspect=(0.5, 2.0))
    jitter = augment.crop_and_flip.transforms[0]
    video = tv_tensors.Video(torch.zeros(2, 3, height, width, dtype=torch.uint8))
    boxes = [jitter.make_params([video]) for _ in range(500)]
    areas, aspects = [], []
    for box in boxes:
        top, left, h, w = box["top"], box["left"], box["height"], box["width"]
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
        areas.append(h * w / (height * width))
        aspects.append(w / h)
    # Sides are rounded to whole pixels, so area and aspect may leave the range by about a pixel's worth.
    assert min(areas) >= 0.08 * 0.95 and max(areas) <= 1.0
    assert min(aspects) >= 0.5 * 0.95 and max(aspects) <= 2.0 * 1.05
    assert min(areas) < 0.2 and max(areas) > 0.7  # it does jitter the scale ...
    assert min(aspects) < 0.7 and max(aspects) > 1.4  # ... and the aspect


def test_train_augment_shapes_and_flip():
    clip = torch.randint(0, 256, (6, 40, 60, 3), dtype=torch.uint8)
    jittered = sampling.TrainAugment(24, scale_jitter=True)(clip)
    assert jittered.shape == (3, 6, 24, 24) and jittered.dtype == torch.uint8
    plain = sampling.TrainAugment(24, scale_jitter=False, short_side=24, flip=False)
    assert plain(clip).shape == (3, 6, 24, 24)
    ramp = torch.arange(24, dtype=torch.uint8).repeat(2, 24, 1).unsqueeze(-1).expand(-1, -1, -1, 3).contiguous()
    augment = sampling.TrainAugment(24, False, short_side=24)
    flips = set()
    for _ in range(40):
        row = augment(ramp)[0, 0, 0]
        flips.add(bool(row[0] > row[-1]))
    assert flips == {True, False}  # both orientations occur


@pytest.mark.parametrize("scale_jitter", [True, False])
def test_train_augment_gives_every_frame_of_a_clip_the_same_crop_and_flip(scale_jitter):
    torch.manual_seed(0)
    frame = torch.randint(0, 256, (1, 40, 60, 3), dtype=torch.uint8)
    augment = sampling.TrainAugment(24, scale_jitter, short_side=30)
    for _ in range(10):
        clip = augment(frame.expand(5, -1, -1, -1).contiguous())
        assert all(torch.equal(clip[:, t], clip[:, 0]) for t in range(1, 5))
