"""`rs-transfer bench video-data`: how many training clips per second the video loader makes, per worker.

A clip is the full training path: open the file, count frames, decode from the start to the end of a random
32 x stride-2 window (PyAV), scale-jitter crop to 224, flip, normalise. Without `--root` it writes a few
Kinetics-like videos first (340x256, 10 s at 30 fps, H.264: the common resized K400 copy), so the number means
something without the dataset; with `--root` it reads the real training split.
"""

import tempfile
import time
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


def _train_videos(root: Path) -> list:
    return [data.Video(path, 0) for path in sorted((root / "train" / "moving right").iterdir())]


def run_cli(args) -> int:
    """For the `bench video-data` subcommand: args.root, args.workers (list of ints), args.clips."""
    import json

    print(json.dumps(bench_video_data(args.root, args.workers, args.clips), indent=2))
    return 0
