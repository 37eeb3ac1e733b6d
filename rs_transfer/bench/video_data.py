"""`rs-transfer bench video-data`: how many training clips per second the video loader makes, per worker, and
whether a clip at the end of a video costs what one at its start does (`late_over_early`).

A clip is the full training path: open the file once, count frames, seek to the keyframe before a random
32 x stride-2 window and decode to its end (PyAV), scale-jitter crop to 224, flip; clips stay uint8. Without
`--root` it writes a few Kinetics-like videos first (340x256, 10 s at 30 fps, H.264: the common resized K400 copy),
so the number means something without the dataset; with `--root` it reads the real training split.
"""

import tempfile
import time

import av
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from rs_transfer.video import data, sampling, synthetic


def write_kinetics_like(root: Path, count: int = 4, seconds: int = 10, fps: int = 30) -> Path:
    rng = np.random.default_rng(0)
    for i in range(count):
        frames = synthetic.moving_square((0, 1), seconds * fps, 256, rng)
        frames = np.concatenate([frames, frames[:, :, :84]], axis=2)  # 256 x 340, the resized K400 size
        synthetic.write_video(root / "train" / "moving right" / f"{i}.mp4", frames, fps=fps)
    return root


def bench_video_data(root: str | None, workers: list, clips: int, clip_frames: int = 32, frame_stride: int = 2,
                     crop_size: int = 224) -> list:
    """[{workers, clips_per_s, clips_per_s_per_worker}] for each worker count (0 = in the main process)."""
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(root) if root else write_kinetics_like(Path(tmp))
        videos, _ = data.list_videos(source, "train") if root else (_train_videos(source), None)
        dataset = data.TrainClips(videos, clip_frames, frame_stride, sampling.TrainAugment(crop_size, True))
        results = []
        for count in workers:
            loader = DataLoader(dataset, batch_size=1, num_workers=count,
                                sampler=torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=clips))
            start = None
            done = 0
            for i, _ in enumerate(loader):
                if i == max(count, 1) - 1:  # time from when every worker has delivered its first clip
                    start, done = time.perf_counter(), 0
                    continue
                done += 1
            elapsed = time.perf_counter() - start
            rate = done / elapsed
            results.append({"workers": count, "clips_per_s": round(rate, 2),
                            "clips_per_s_per_worker": round(rate / max(count, 1), 2)})
        return results


def write_seek_video(path: Path, seconds: int = 10, fps: int = 25, gop: int = 25) -> Path:
    """A 10 s, 25 fps, 340x256 H.264 MP4 with a keyframe every `gop` frames (YouTube-like; x264's default of 250
    would make the whole video one GOP). Light noise on every frame, so decoding costs what real footage does."""
    rng = np.random.default_rng(0)
    frames = synthetic.moving_square((0, 1), seconds * fps, 256, rng)
    frames = np.concatenate([frames, frames[:, :, :84]], axis=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width, stream.pix_fmt = frames.shape[1], frames.shape[2], "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "23", "g": str(gop), "bf": "2"}
        for image in frames:
            noisy = np.clip(image + rng.integers(0, 16, image.shape, dtype=np.uint8), 0, 255).astype(np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(noisy, format="rgb24")))
        container.mux(stream.encode())
    return path


def bench_late_over_early(path: Path, clip_frames: int = 32, frame_stride: int = 2, repeats: int = 10) -> dict:
    """CPU seconds of this process to open `path` and decode the clip that ends on its last frame over the clip that
    starts on its first (medians of `repeats`), by seeking and, as the reference, by decoding from the start.

    CPU time, and the two clips interleaved (early, late, early, late, ...): timed by the wall clock one after the
    other, a change of the machine's load between the early and the late batch moved the ratio across our 1.3
    bound while the interleaved CPU-time ratio stayed at 1.02."""
    span = sampling.clip_span(clip_frames, frame_stride)
    results = {}
    for name, seek in (("late_over_early", True), ("late_over_early_from_start", False)):
        samples = {"early": [], "late": []}
        for _ in range(repeats):
            for where in ("early", "late"):
                begin = time.process_time()
                with data.VideoReader(path) as video:
                    start = 0 if where == "early" else video.num_frames - span
                    video.decode(sampling.clip_indices(start, clip_frames, frame_stride, video.num_frames), seek=seek)
                samples[where].append(time.process_time() - begin)
        times = {where: float(np.median(values)) for where, values in samples.items()}
        results[name] = round(times["late"] / max(times["early"], 1e-9), 2)
        results[f"{name}_ms"] = {where: round(1000 * t, 1) for where, t in times.items()}
    return results


def _train_videos(root: Path) -> list:
    return [data.Video(path, 0) for path in sorted((root / "train" / "moving right").iterdir())]


def run_cli(args) -> int:
    """For the `bench video-data` subcommand: args.root, args.workers (list of ints), args.clips. Prints JSON:
    {"loader": [bench_video_data's rows], "late_over_early": ..., ...bench_late_over_early's other keys}."""
    import json

    with tempfile.TemporaryDirectory() as tmp:
        seeking = bench_late_over_early(write_seek_video(Path(tmp) / "seek.mp4"))
    print(json.dumps({"loader": bench_video_data(args.root, args.workers, args.clips), **seeking}, indent=2))
    return 0
