"""A tiny generated Kinetics: a square moving across noise, whose direction is the class.

Written in any real on-disk layout (class folders, CSV annotations with youtube_id-named files, or a SlowFast
`path label` list with classes.txt) through PyAV: H.264 in .mp4 / .mkv, VP9 in .webm (real Kinetics copies mix
all three), so the demo and the tests read it with exactly the code that reads Kinetics-400 and users' videos.
A single frame cannot tell the classes apart; only motion can, so a model that learns it uses the time axis.
"""

import csv
from pathlib import Path

import av
import numpy as np

DIRECTIONS = {"moving right": (0, 1), "moving left": (0, -1), "moving down": (1, 0), "moving up": (-1, 0)}


def moving_square(direction: tuple, num_frames: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 frames (T, size, size, 3): a bright square stepping 1 px per frame over a dark background. It starts
    where it stays inside the frame as long as it can (a square wrapping round an edge would look like a jump the
    other way); position, colour and background level are random per video."""
    side = max(size // 4, 2)
    frames = np.full((num_frames, size, size, 3), rng.integers(0, 60), dtype=np.uint8)
    colour = rng.integers(150, 256, 3, dtype=np.uint8)
    room = max(size - side - (num_frames - 1), 0)
    start = []
    for step in direction:
        if step == 0:
            start.append(int(rng.integers(0, size - side + 1)))
        else:
            along = int(rng.integers(0, room + 1))
            start.append(along if step > 0 else size - side - along)
    for t in range(num_frames):
        rows = (np.arange(side) + start[0] + t * direction[0]) % size
        cols = (np.arange(side) + start[1] + t * direction[1]) % size
        frames[t][np.ix_(rows, cols)] = colour
    return frames


# WebM holds only VP8/VP9/AV1; every other container gets H.264.
CODECS = {".webm": ("libvpx-vp9", {"deadline": "realtime", "cpu-used": "8", "crf": "18", "b": "0"})}
H264 = ("libx264", {"preset": "ultrafast", "crf": "18"})


def write_video(path: Path, frames: np.ndarray, fps: int = 25) -> None:
    """Encode uint8 frames (T, H, W, 3) to `path`; the codec follows the suffix (CODECS). An MP4 gets its index
    (moov) first, as streamed downloads such as YouTube's have it, so a copy cut short still declares every frame."""
    path.parent.mkdir(parents=True, exist_ok=True)
    codec, options = CODECS.get(path.suffix.lower(), H264)
    container_options = {"movflags": "faststart"} if path.suffix.lower() == ".mp4" else {}
    with av.open(str(path), mode="w", options=container_options) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.options = dict(options)
        for image in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())


def write_dataset(root: str | Path, layout: str = "folders", videos_per_class: dict | None = None,
                  num_frames: int = 24, size: int = 32, classes: tuple | dict = tuple(DIRECTIONS), seed: int = 0,
                  suffixes: tuple = (".mp4",)) -> Path:
    """Write train and val splits under `root` in the "folders" or "csv" Kinetics layout, or the "list" layout
    (write_lists); returns `root`. classes: names of DIRECTIONS, or {any name: (row step, column step)}.

    Video i of a class gets container suffixes[i % len(suffixes)], so ".mp4", ".mkv", ".webm" mixes them. The same
    seed writes the same videos in every layout."""
    if layout not in ("folders", "csv", "list"):
        raise ValueError(f"unknown layout {layout!r}: expected 'folders', 'csv' or 'list'")
    root = Path(root)
    directions = classes if isinstance(classes, dict) else {name: DIRECTIONS[name] for name in classes}
    videos_per_class = videos_per_class or {"train": 16, "val": 4}
    rng = np.random.default_rng(seed)
    rows = {split: [] for split in videos_per_class}
    for split, count in videos_per_class.items():
        for name, direction in directions.items():
            for i in range(count):
                frames = moving_square(direction, num_frames, size, rng)
                suffix = suffixes[i % len(suffixes)]
                if layout == "folders":
                    write_video(root / split / name / f"{split}_{i:04d}{suffix}", frames)
                elif layout == "list":
                    path = Path("videos") / split / name / f"{split}_{i:04d}{suffix}"
                    write_video(root / path, frames)
                    rows[split].append((path.as_posix(), name))
                else:
                    youtube_id = f"{name.split()[-1]}{split}{i:04d}"[:11]
                    start = 10 * i
                    write_video(root / split / f"{youtube_id}_{start:06d}_{start + 10:06d}{suffix}", frames)
                    rows[split].append((name, youtube_id, start, start + 10, split))
    if layout == "csv":
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        for split, split_rows in rows.items():
            with open(root / "annotations" / f"{split}.csv", "w", newline="") as file:
                writer = csv.writer(file)
                writer.writerow(["label", "youtube_id", "time_start", "time_end", "split"])
                writer.writerows(split_rows)
    elif layout == "list":
        write_lists(root, rows)
    return root


def write_lists(root: Path, rows: dict) -> None:
    """SlowFast's list layout from {split: [(path relative to root, class name)]}: ROOT/<split>.csv with one
    `path index` line per video (space separated, as SlowFast's are; the paths hold spaces) and the names in
    ROOT/classes.txt. Classes and lines are sorted as the class-folder layout lists them, so the same seed gives the
    same videos with the same indices in the same order, and the same training run, in both layouts."""
    names = sorted({name for split_rows in rows.values() for _, name in split_rows})
    index = {name: i for i, name in enumerate(names)}
    (root / "classes.txt").write_text("".join(f"{name}\n" for name in names), encoding="utf-8")
    for split, split_rows in rows.items():
        lines = sorted(split_rows, key=lambda row: (row[1], row[0]))
        (root / f"{split}.csv").write_text("".join(f"{path} {index[name]}\n" for path, name in lines),
                                           encoding="utf-8")
