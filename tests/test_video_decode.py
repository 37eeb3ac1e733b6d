"""Decoding by seeking: the frames equal those decoded from the start, bit for bit, wherever the clip lies, in every
container Kinetics copies use; one open serves a clip; FFmpeg's threads are limited inside loader workers."""

import av
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from rs_transfer.video import data, synthetic

NUM_FRAMES = 40
GOP = 8  # keyframes every 8 frames: a clip at the end starts 4 GOPs in


def _write(path, frames, codec_options: dict):
    """Like synthetic.write_video, but with the codec options given (a short GOP, B-frames)."""
    codec = "libvpx-vp9" if path.suffix == ".webm" else "libx264"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=25)
        stream.height, stream.width, stream.pix_fmt = frames.shape[1], frames.shape[2], "yuv420p"
        stream.options = codec_options
        for image in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
    return path


OPTIONS = {
    # H.264 with B-frames (decode order differs from display order), as real Kinetics copies have them.
    ".mp4": {"preset": "medium", "bf": "3", "g": str(GOP), "crf": "18"},
    ".mkv": {"preset": "medium", "bf": "3", "g": str(GOP), "crf": "18"},
    ".webm": {**synthetic.CODECS[".webm"][1], "g": str(GOP)},
}


@pytest.fixture(scope="module")
def short_gop_videos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gop")
    rng = np.random.default_rng(0)
    frames = synthetic.moving_square((0, 1), NUM_FRAMES, 32, rng)
    # Noise on every frame, so no frame is a copy of another and a wrong frame cannot pass for the right one.
    frames = np.clip(frames.astype(int) + rng.integers(-20, 21, frames.shape), 0, 255).astype(np.uint8)
    return {suffix: _write(folder / f"gop{suffix}", frames, options) for suffix, options in OPTIONS.items()}


@pytest.mark.parametrize("suffix", list(OPTIONS))
def test_seeking_gives_the_frames_decoding_from_the_start_gives(short_gop_videos, suffix):
    path = short_gop_videos[suffix]
    with data.VideoReader(path) as video:
        assert video.num_frames == NUM_FRAMES
        assert len(video.keyframe_pts) >= NUM_FRAMES // GOP  # the file has the short GOP the test needs
        reference = video.decode(range(NUM_FRAMES), seek=False)
    assert len({frame.tobytes() for frame in reference.values()}) == NUM_FRAMES  # every frame differs
    clips = {"start": range(0, 8), "middle": range(13, 29, 2), "end": range(32, 40), "one frame": [GOP * 3 + 1]}
    for where, indices in clips.items():
        with data.VideoReader(path) as video:
            frames = video.decode(indices)
            again = video.decode([indices[0]])  # a second seek on the same open file
        assert sorted(frames) == list(indices), where
        for i in indices:
            assert frames[i].dtype == np.uint8 and np.array_equal(frames[i], reference[i]), (where, i)
        assert np.array_equal(again[indices[0]], reference[indices[0]]), where


@pytest.mark.parametrize("suffix", list(OPTIONS))
def test_clip_at_the_end_decodes_only_from_its_keyframe(short_gop_videos, suffix, monkeypatch):
    decoded = []
    original = data._decoded

    def counting(container, stream):
        for frame in original(container, stream):
            decoded.append(frame.pts)
            yield frame

    monkeypatch.setattr(data, "_decoded", counting)
    with data.VideoReader(short_gop_videos[suffix]) as video:
        video.decode(range(34, 40))
        assert len(decoded) <= GOP  # from the keyframe at 32 to frame 39, not 40 frames from the start
        decoded.clear()
        video.decode(range(34, 40), seek=False)
        assert len(decoded) == NUM_FRAMES


def test_without_a_pts_on_every_frame_it_decodes_from_the_start(short_gop_videos):
    with data.VideoReader(short_gop_videos[".mkv"]) as video:
        reference = video.decode([21, 22])
        video.frame_pts = None  # what a container without timestamps (some AVI) gives
        assert all(np.array_equal(a, b) for a, b in zip(video.decode([21, 22]).values(), reference.values()))


def test_one_open_per_clip(short_gop_videos, monkeypatch):
    opened = []
    original = av.open
    monkeypatch.setattr(av, "open", lambda *args, **kwargs: opened.append(args[0]) or original(*args, **kwargs))
    clips = data.TrainClips([data.Video(short_gop_videos[".mp4"], 0)], clip_frames=4, frame_stride=2,
                            augment=lambda clip: clip)
    clip, _ = clips[0]
    assert clip.shape == (4, 32, 32, 3) and clip.dtype == torch.uint8
    assert len(opened) == 1


class ThreadCounts(Dataset):
    def __init__(self, path):
        self.path = path

    def __len__(self):
        return 1

    def __getitem__(self, index):
        with data.VideoReader(self.path) as video:
            return video.stream.codec_context.thread_count


def test_ffmpeg_threads_are_one_per_loader_worker_and_automatic_in_the_main_process(short_gop_videos):
    dataset = ThreadCounts(short_gop_videos[".mp4"])
    assert dataset[0] == 0  # FFmpeg's automatic count
    assert [int(n) for n in DataLoader(dataset, num_workers=1)] == [1]
