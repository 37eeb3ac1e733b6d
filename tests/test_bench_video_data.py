"""`rs-transfer bench video-data` (rs_transfer/bench/video_data.py): clips per second from a generated Kinetics
folder, and the late-over-early decode ratio by seeking and from the start."""

import pytest

from rs_transfer.bench.video_data import bench_late_over_early, bench_video_data, write_seek_video
from rs_transfer.video import data, synthetic


def test_bench_video_data_reports_clips_per_second(tmp_path):
    folders = synthetic.write_dataset(tmp_path / "folders", "folders", {"train": 2, "val": 1}, num_frames=20, size=32)
    (result,) = bench_video_data(str(folders), [0], clips=4, clip_frames=4, crop_size=16)
    assert result["workers"] == 0 and result["clips_per_s"] > 0


def test_bench_late_over_early_times_both_ends_by_seeking_and_from_the_start(tmp_path):
    path = write_seek_video(tmp_path / "seek.mp4", seconds=2, fps=10, gop=5)
    assert data.count_frames(path) == 20
    result = bench_late_over_early(path, clip_frames=4, frame_stride=2, repeats=1)
    assert set(result) == {"late_over_early", "late_over_early_ms", "late_over_early_from_start",
                           "late_over_early_from_start_ms"}
    for name in ("late_over_early", "late_over_early_from_start"):
        ms = result[f"{name}_ms"]
        assert ms["early"] > 0 and ms["late"] > 0
        assert result[name] == pytest.approx(ms["late"] / ms["early"], rel=0.1)
