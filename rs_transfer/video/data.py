"""Video datasets on disk (Kinetics-400 or a user's own): finding the videos of a split, decoding them with PyAV,
and the training clip dataset.

Three layouts are read (`find_layout` tells them apart):
- class folders: ROOT/train/<class name>/*.mp4 and ROOT/val/<class name>/*.mp4 (any class names and count)
- SlowFast's and mmaction2's lists: ROOT/train.csv and ROOT/val.csv (or .txt), `path label` per line, and optional
  class names in ROOT/classes.txt; read by video/lists.py, whose docstring gives the rules
- the CSV annotations as distributed (e.g. the CVDF copy): ROOT/annotations/train.csv and ROOT/annotations/val.csv
  (or validate.csv), columns label,youtube_id,time_start,time_end,split[,is_cc], and the videos in
  ROOT/train/ and ROOT/val/ named <youtube_id>_<time_start:06d>_<time_end:06d> plus any suffix of VIDEO_SUFFIXES
  (copies mix mp4, mkv and webm). Rows whose video is missing (many copies lack some) are left out with one log
  line giving the count.
In the folder and Kinetics CSV layouts, class indices are the sorted class names of the training split, so train
and val agree (lists index their classes as lists.py says). In the class-folder layout
these are the names of the folders in train/, empty ones included (with a warning naming each): a folder whose
videos failed to download keeps its index, so the indices of the classes after it never shift. Folders whose name
starts with a dot are not classes.

Our own dataset instead of pytorchvideo's `LabeledVideoDataset`: that one is an IterableDataset, while the engine
shards a map-style dataset with a DistributedSampler (and resumes it exactly); decoding is a few lines of PyAV.
A video that cannot be decoded or is too short is skipped with a log line naming it and a running count. Frames
are counted by demuxing, not read from the header: a download cut short keeps a header declaring every frame.
A clip opens its file once (VideoReader) and decodes from the keyframe before its first frame, so a clip at the
end of a video costs about what one at its start does.
"""

import bisect
import csv
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import torch
from torch.utils.data import Dataset

from rs_transfer.data.folders import check_sorted, class_folders
from rs_transfer.data.text import open_csv
from rs_transfer.errors import DataError
from rs_transfer.video import lists, sampling

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = lists.VIDEO_FILE_SUFFIXES
SPLIT_CSV = {"train": ("train.csv",), "val": ("val.csv", "validate.csv")}


class UnreadableVideo(Exception):
    """A video that cannot be decoded or has too few frames; the caller skips it."""


@dataclass(frozen=True)
class Video:
    path: Path
    label: int


def find_layout(root: str | Path, list_files: dict | None = None) -> str:
    """"list", "csv" or "folders": the layout of `root`. Lists named in the config (`list_files`, {split: file})
    make it "list"; otherwise Kinetics' annotations/train.csv, then ROOT/train.csv or train.txt, then ROOT/train/.
    Raises DataError naming the root when it is missing or holds none of them."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"video data root not found: {root}")
    if list_files:
        return "list"
    if (root / "annotations" / "train.csv").is_file():
        return "csv"
    if lists.find_list(root, "train") is not None:
        return "list"
    if (root / "train").is_dir():
        return "folders"
    raise DataError(
        f"{root} holds no video layout: expected {root}/train/<class>/*.mp4 (class folders), {root}/train.csv or "
        f"train.txt (a `path label` list), or {root}/annotations/train.csv with videos in {root}/train/ (Kinetics' "
        "CSV annotations)"
    )


def list_videos(root: str | Path, split: str, list_files: dict | None = None,
                names_file: str | None = None) -> tuple[list, list]:
    """(videos of `split`, class names); class indices come from the training split (or the class names file)."""
    videos, classes = list_splits(root, (split,), list_files, names_file)
    return videos[split], classes


def list_splits(root: str | Path, splits=("train", "val"), list_files: dict | None = None,
                names_file: str | None = None) -> tuple[dict, list]:
    """({split: videos}, class names), reading each split once (the training split gives the classes).

    list_files: {split: list file} from the config (data.train_list, data.val_list), relative to root; names_file:
    data.class_names_file; both only for the list layout. Raises DataError naming the root or file (and line) when
    a layout, annotation file, list, split or class is missing or malformed.
    """
    root = Path(root)
    layout = find_layout(root, list_files)
    if layout == "list":
        found, classes = lists.read_splits(root, splits, list_files or {}, names_file)
        return {split: [Video(path, label) for path, label in found[split]] for split in splits}, classes
    if names_file is not None:
        own = "class folders" if layout == "folders" else "CSV labels"
        raise DataError(f"data.class_names_file={names_file} names the classes of a `path label` list, but {root} "
                        f"holds the {layout} layout, whose classes are its {own}")
    listed = set()  # the CSV layout: every label train.csv lists, whether its videos are on disk or not
    read_rows = _folder_rows if layout == "folders" else lambda root, split: _csv_rows(root, split, listed)
    rows = {"train": read_rows(root, "train")}
    if not rows["train"]:
        raise DataError(f"no training videos found under {root} ({layout} layout)")
    # The CSV's classes, not those of the videos found: a copy that lacks a whole class would otherwise have 399
    # classes (refused by num_classes: 400) and every class after the gap would shift by one index.
    classes = class_folders(root / "train") if layout == "folders" else sorted(listed)
    _warn_classes_without_videos(classes, rows["train"], root, layout)
    index = {name: i for i, name in enumerate(classes)}
    videos = {}
    for split in splits:
        if split not in rows:
            rows[split] = read_rows(root, split)
        videos[split] = []
        for path, label in rows[split]:
            if label not in index:
                raise DataError(
                    f"{path}: class {label!r} of the {split} split has no training videos under {root}"
                )
            videos[split].append(Video(path, index[label]))
        if not videos[split]:
            raise DataError(f"no {split} videos found under {root} ({layout} layout)")
    return videos, classes


def _folder_rows(root: Path, split: str) -> list:
    split_dir = root / split
    if not split_dir.is_dir():
        raise DataError(f"split folder not found: {split_dir} (expected {split_dir}/<class>/*.mp4)")
    rows = []
    for name in class_folders(split_dir):
        class_dir = split_dir / name
        paths = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES)
        if not paths:
            # Usually a failed download or copy; list_splits keeps the class so later classes keep their indices.
            consequence = ("the class keeps its output, which no video teaches" if split == "train"
                           else "nothing of the class is evaluated")
            log.warning("class folder %s holds no videos (%s): %s", class_dir, " ".join(VIDEO_SUFFIXES), consequence)
        rows.extend((path, name) for path in paths)
    check_sorted(split_dir, VIDEO_SUFFIXES, len(rows), "videos")
    return rows


def _warn_classes_without_videos(classes: list, rows: list, root: Path, layout: str) -> None:
    if layout == "folders":
        return  # _folder_rows names each empty class folder itself
    present = {label for _, label in rows}
    absent = [name for name in classes if name not in present]
    if absent:
        log.warning("%d of the %d classes of %s's train.csv have no video under %s (%s%s): they keep their index and "
                    "output, which no video teaches", len(absent), len(classes), root, root / "train",
                    ", ".join(map(repr, absent[:5])), ", ..." if len(absent) > 5 else "")


def _csv_rows(root: Path, split: str, listed: set | None = None) -> list:
    """[(video path, label)] of annotations/<split>.csv whose video is on disk; every label the CSV lists (found or
    not) is added to `listed`."""
    names = SPLIT_CSV.get(split, (f"{split}.csv",))
    csv_path = next((root / "annotations" / n for n in names if (root / "annotations" / n).is_file()), None)
    if csv_path is None:
        raise DataError(f"annotation file not found: {root / 'annotations' / names[0]}")
    on_disk = _videos_by_stem(root / split)
    rows, missing = [], 0
    with open_csv(csv_path) as file:
        reader = csv.DictReader(file)
        needed = {"label", "youtube_id", "time_start", "time_end"}
        if not needed <= set(reader.fieldnames or ()):
            raise DataError(f"{csv_path}: expected columns {sorted(needed)}, found {reader.fieldnames}")
        for line, row in enumerate(reader, start=2):
            try:
                start, end = int(float(row["time_start"])), int(float(row["time_end"]))
            except ValueError:
                raise DataError(f"{csv_path}, line {line}: time_start/time_end are not numbers") from None
            path = on_disk.get(f"{row['youtube_id']}_{start:06d}_{end:06d}")
            if listed is not None:
                listed.add(row["label"])
            if path is None:
                missing += 1
            else:
                rows.append((path, row["label"]))
    if missing:
        log.info("%s: %d of %d listed videos are missing under %s and left out", csv_path, missing,
                 missing + len(rows), root / split)
    return rows


def _videos_by_stem(folder: Path) -> dict:
    """{file name without its suffix: path} of the videos in `folder` (none when it does not exist).

    One listing instead of a lookup per CSV row (Kinetics-400's train.csv has about 240k rows). A clip saved in two
    containers resolves to the suffix listed first in VIDEO_SUFFIXES, whatever order the folder lists them in.
    """
    if not folder.is_dir():
        return {}
    with os.scandir(folder) as entries:
        paths = [Path(e.path) for e in entries if Path(e.name).suffix.lower() in VIDEO_SUFFIXES and e.is_file()]
    found = {}
    for path in sorted(paths, key=lambda p: VIDEO_SUFFIXES.index(p.suffix.lower())):
        found.setdefault(path.stem, path)
    return found


def decoder_threads() -> int:
    """FFmpeg's decoding threads for a video opened in this process: 1 inside a DataLoader worker, 0 (FFmpeg picks,
    about one per core) in the main process."""
    # Each loader worker already decodes its own video; N workers that each start one FFmpeg thread per core would
    # run N x cores threads on the cores and lose time switching between them.
    return 1 if torch.utils.data.get_worker_info() is not None else 0


class VideoReader:
    """One open video: its whole frames counted on opening, then the wanted ones decoded from the keyframe before
    the first of them. Open once per clip: `with VideoReader(path) as video: video.decode(indices)`.

    Frames are counted by demuxing (about 1-2 ms for a 10 s clip), not read from the header: a download cut short
    keeps a header declaring every frame. The same pass records each packet's pts, which maps frame index <-> pts
    for seeking. Raises UnreadableVideo.
    """

    def __init__(self, path):
        self.path = path
        try:
            self.container = av.open(str(path))
        except av.FFmpegError as error:
            raise UnreadableVideo(f"{type(error).__name__}: {error}") from None
        try:
            if not self.container.streams.video:
                raise UnreadableVideo("no video stream")
            self.stream = self._open_stream(self.container)
            packets = [(p.pts, p.is_keyframe) for p in _whole_packets(self.container, self.stream)]
        except av.FFmpegError as error:
            self.container.close()
            raise UnreadableVideo(f"{type(error).__name__}: {error}") from None
        except UnreadableVideo:
            self.container.close()
            raise
        self.num_frames = len(packets)
        # Decoding from the start yields frames in display order, so frame i is the packet with the i-th smallest
        # pts. Without a pts on every packet, or with repeated ones, the mapping is unknown: no seeking then.
        pts = [p for p, _ in packets]
        exact = None not in pts and len(set(pts)) == len(pts)
        self.frame_pts = sorted(pts) if exact else None
        self.keyframe_pts = sorted(p for p, key in packets if key) if exact else []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.container.close()

    @staticmethod
    def _open_stream(container):
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        stream.codec_context.thread_count = decoder_threads()
        return stream

    def decode(self, indices, short_side: int | None = None, seek: bool = True) -> dict:
        """{frame index: uint8 array (H, W, 3)} for the wanted indices (each below `num_frames`).

        Seeks to the keyframe at or before the first wanted frame and decodes forward to the last one; where the
        container cannot seek exactly (or `seek` is False) it decodes from the start instead. Both give the same
        pixels. `short_side` resizes during decoding (FFmpeg's swscale, bilinear), which keeps memory small for
        full-resolution videos. Raises UnreadableVideo, also for an index at or past `num_frames`.
        """
        wanted = sorted(set(int(i) for i in indices))
        if wanted[-1] >= self.num_frames:
            raise UnreadableVideo(f"frame {wanted[-1]} wanted but {self.num_frames} frames decode "
                                  "(the file ends early)")
        try:
            frames = self._decode_after_seek(wanted, short_side) if seek else None
            if frames is None:
                frames = self._decode_from_start(wanted, short_side)
        except (av.FFmpegError, IndexError) as error:
            raise UnreadableVideo(f"{type(error).__name__}: {error}") from None
        if len(frames) < len(wanted):
            raise UnreadableVideo(f"decoded {len(frames)} of {len(wanted)} wanted frames (the file ends early)")
        return frames

    def _decode_after_seek(self, wanted: list, short_side) -> dict | None:
        """The wanted frames, decoded from the keyframe before the first; None where the seek was not exact."""
        if self.frame_pts is None:
            return None
        first_pts = self.frame_pts[wanted[0]]
        keyframe = bisect.bisect_right(self.keyframe_pts, first_pts) - 1
        if keyframe < 0:
            return None
        index_of = {pts: i for i, pts in enumerate(self.frame_pts)}
        self.container.seek(self.keyframe_pts[keyframe], stream=self.stream, backward=True, any_frame=False)
        decoded = ((index_of.get(frame.pts, -1), frame) for frame in _decoded(self.container, self.stream))
        frames = _collect(decoded, wanted, short_side)
        # A frame without a known pts, or a first wanted frame the seek jumped past: the demuxer landed elsewhere.
        return frames if frames is not None and len(frames) == len(wanted) else None

    def _decode_from_start(self, wanted: list, short_side) -> dict:
        # A fresh open rather than a seek to 0: this is the path for containers whose seeking we do not trust.
        with av.open(str(self.path)) as container:
            return _collect(enumerate(_decoded(container, self._open_stream(container))), wanted, short_side)


def _collect(decoded, wanted: list, short_side) -> dict | None:
    """{index: rgb24 array} of the wanted frames among `decoded`, (index, frame) pairs in display order; stops after
    the last wanted frame. None if a frame's index is unknown (-1) or a wanted frame was passed over."""
    wanted_set = set(wanted)
    frames = {}
    for i, frame in decoded:
        if i < 0 or i > wanted[len(frames)]:
            return None
        if i in wanted_set:
            if short_side is not None:
                height, width = sampling.short_side_size(frame.height, frame.width, short_side)
                frame = frame.reformat(width=width, height=height, interpolation="BILINEAR")
            frames[i] = frame.to_ndarray(format="rgb24")
            if len(frames) == len(wanted):
                break
    return frames


def count_frames(path: Path) -> int:
    """Frames that decode from the first video stream (VideoReader.num_frames). Raises UnreadableVideo."""
    with VideoReader(path) as video:
        return video.num_frames


def decode_frames(path: Path, indices, short_side: int | None = None, seek: bool = True) -> dict:
    """{frame index: uint8 array (H, W, 3)}: VideoReader.decode on a file opened for these frames alone.
    Raises UnreadableVideo."""
    with VideoReader(path) as video:
        return video.decode(indices, short_side, seek)


def _whole_packets(container, stream):
    """The stream's packets up to the end of the file or up to the first one cut short, which FFmpeg flags corrupt
    (the partial last packet of a truncated download: decoding it raises). One packet holds one frame."""
    for packet in container.demux(stream):
        if packet.is_corrupt:
            return
        if packet.size:  # the demuxer ends with an empty packet; _decoded flushes the decoder itself
            yield packet


def _decoded(container, stream):
    """Frames of the whole packets in order, then those the decoder still holds (B-frames are reordered)."""
    for packet in _whole_packets(container, stream):
        yield from packet.decode()
    yield from stream.codec_context.decode(None)


class SkipCounter:
    """Counts skipped videos in this process and logs each one by name."""

    def __init__(self):
        self.count = 0

    def skip(self, path, reason: str) -> None:
        self.count += 1
        log.warning("skipping video %s: %s (%d skipped so far in this process)", path, reason, self.count)


class TrainClips(Dataset):
    """One random clip per video per epoch: (uint8 clip (3, T, S, S) from `augment`, label). The model converts and
    normalises on its device (models.normalize.Normalize): a uint8 batch is a quarter of a float one to copy between
    processes and to the device.

    A video that fails (unreadable, or fewer than `clip_frames` frames) is replaced by the next one in the list,
    so batches keep their size; each failure is logged by name and counted.
    """

    def __init__(self, videos: list, clip_frames: int, frame_stride: int, augment, max_tries: int = 10):
        self.videos = videos
        self.clip_frames = clip_frames
        self.frame_stride = frame_stride
        self.augment = augment
        self.max_tries = max_tries
        self.skipped = SkipCounter()

    def __len__(self):
        return len(self.videos)

    def __getitem__(self, index):
        reasons = []
        for attempt in range(self.max_tries):
            video = self.videos[(index + attempt) % len(self.videos)]
            try:
                return self.augment(self.load_clip(video.path)), video.label
            except UnreadableVideo as error:
                self.skipped.skip(video.path, str(error))
                reasons.append(str(error))
        if all(reason.startswith("too short") for reason in reasons):
            raise DataError(f"{self.max_tries} videos in a row from {self.videos[index].path} on are shorter than a "
                            f"clip ({reasons[-1].removeprefix('too short: ')}): lower data.clip_frames (or "
                            "data.frame_stride)")
        raise DataError(f"{self.max_tries} videos in a row from {self.videos[index].path} on are unreadable or too "
                        f"short (the last: {reasons[-1]})")

    def load_clip(self, path) -> torch.Tensor:
        with VideoReader(path) as video:
            num_frames = video.num_frames
            if num_frames < self.clip_frames:
                raise UnreadableVideo(f"too short: {num_frames} frames, a clip needs {self.clip_frames}")
            start = sampling.random_clip_start(num_frames, self.clip_frames, self.frame_stride)
            indices = sampling.clip_indices(start, self.clip_frames, self.frame_stride, num_frames)
            frames = video.decode(indices)
        return torch.from_numpy(np.stack([frames[i] for i in indices]))  # (T, H, W, 3) uint8
