"""The video task: the 3D network from the config (built, inflated from 2D or loaded), the training clips, the
30-view evaluator, and the engine Task made of them. The config schema is video/config.py; the `video train` /
`video eval` commands are video/run.py. The model is the engine's classification wrapper
(engine/classification.py: uint8 clips normalised on the device, label-smoothed cross-entropy).
"""

import logging
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from rs_transfer.config import ConfigError, data_root, record_inferred
from rs_transfer.engine.classification import Classifier, TopK, fractions
from rs_transfer.engine.distributed import all_reduce_sum
from rs_transfer.engine.device import model_device
from rs_transfer.engine.loader import close_loader, eval_loader
from rs_transfer.engine.task import Task
from rs_transfer.engine.write_once import write_once
from rs_transfer.families import TaskDeclaration
from rs_transfer.errors import DataError, UserError
from rs_transfer.models.resnet3d_rs import ResNet3d, create_model_3d
from rs_transfer.models.zoo import ArchArgs
from rs_transfer.models.weights import load_weights
from rs_transfer.predictor import Predictor, write_top5
from rs_transfer.video import data, sampling, synthetic
from rs_transfer.video.config import VideoConfig, VideoDataConfig

log = logging.getLogger(__name__)


def build_net(config: VideoConfig) -> ResNet3d:
    model_cfg = config.model
    if model_cfg.num_classes is None:
        raise ValueError("model.num_classes is unset: resolve_classes sets it from the data before building")
    if model_cfg.inflate_from is not None and model_cfg.weights is not None:
        raise ConfigError("give model.inflate_from (a 2D checkpoint) or model.weights (a 3D one), not both")
    net = create_model_3d(
        model_cfg.name, num_classes=model_cfg.num_classes, inflate_from=model_cfg.inflate_from,
        inflate=model_cfg.inflate, temporal_kernels=model_cfg.temporal_kernels, self_gating=model_cfg.self_gating,
        stem_pool=model_cfg.stem_pool, avg_down=model_cfg.avg_down, **ArchArgs.from_config(model_cfg).as_dict(),
    )
    if model_cfg.weights is not None:
        # A 3D checkpoint of ours (`video train`'s weights.pth, final.pt or checkpoints; EMA weights preferred),
        # classifier included: keys, shapes and float-ness must fit.
        load_weights(net, model_cfg.weights, new_classifier=False,
                     what=f"the 3D {type(net).__name__} built from the config",
                     hint=" (check model.name, model.num_classes, model.temporal_kernels and model.self_gating)")
    return net


def build_model(config: VideoConfig) -> Classifier:
    """The 3D network of model.* (model.num_classes set) in engine.classification.Classifier (clips uint8
    (N, 3, T, H, W); eval mode: logits (N, classes)), no data read. Raises as build_net."""
    return Classifier(build_net(config), config.train.label_smoothing)


def prepare_root(config: VideoConfig) -> Path:
    root = data_root(config.data.root, "the videos: train/<class>/<videos> and val/, or train.csv and val.csv "
                                       "lists (see docs/video.md)")
    if config.data.synthetic:  # written once, atomically; a folder that holds data is used as it is
        layout = config.data.synthetic_layout

        def write(folder):
            # said out loud: with a mistyped data.root a demo config would otherwise train on generated videos
            log.warning("data.synthetic is on and %s holds no data: writing generated videos (moving squares, %s "
                        "layout) there; data.synthetic=false to train on your own videos", root, layout)
            return synthetic.write_dataset(folder, layout, seed=config.seed)

        write_once(root, write)
    return root


def list_data(config: VideoConfig, root: Path, splits=("train", "val")) -> tuple[dict, list]:
    """({split: videos}, class names) under `root` in whichever layout it holds, with the list and names files of
    data.* (data.list_splits). Raises DataError as data.list_splits."""
    data_cfg = config.data
    list_files = {split: given for split, given in (("train", data_cfg.train_list), ("val", data_cfg.val_list))
                  if given is not None}
    return data.list_splits(root, splits, list_files, data_cfg.class_names_file)


def resolve_classes(config: VideoConfig, classes: list, root: Path) -> None:
    """Fill in the data's classes: `config.data.class_names` and `config.model.num_classes` when unset (so the saved
    run config holds them, and `predict` names classes without the data); raise ConfigError naming both when either
    is set to something else."""
    given = config.data.class_names
    if given is None:
        record_inferred(config, "data.class_names", list(classes))
    elif [str(name) for name in given] != list(classes):
        # Kinetics has 400 names: show where the two lists part, not both whole
        at = next((i for i, (a, b) in enumerate(zip(given, classes)) if str(a) != b), min(len(given), len(classes)))
        theirs = repr(classes[at]) if at < len(classes) else "nothing"
        ours = repr(given[at]) if at < len(given) else "nothing"
        raise ConfigError(f"data.class_names ({len(given)} names) disagrees with the {len(classes)} classes of {root}: "
                          f"class {at} is {ours} in data.class_names, {theirs} in the data (leave data.class_names "
                          "unset to take the data's)")
    if config.model.num_classes is None:
        record_inferred(config, "model.num_classes", len(classes))
        log.info("model.num_classes=%d: the training classes under %s", len(classes), root)
    elif config.model.num_classes != len(classes):
        raise ConfigError(f"model.num_classes={config.model.num_classes} but {root} has {len(classes)} training "
                          "classes (leave model.num_classes unset to take the data's count)")


def build_task(config: VideoConfig) -> Task:
    """The video Task: class folders, a `path label` list or Kinetics' CSV layout under data.root (train, val), the
    3D network in engine.classification.Classifier (clips uint8 (N, 3, T, H, W); eval mode: logits (N, classes)),
    30-view top-1 / top-5 (evaluate_videos). Fills in data.class_names and model.num_classes (resolve_classes).
    Raises DataError for a missing or malformed layout, ConfigError for an unset data.root, a data.class_names or
    model.num_classes that disagrees with the data or both inflate_from and weights, WeightsError for weights that
    do not fit."""
    root = prepare_root(config)
    data_cfg = config.data
    videos, classes = list_data(config, root, ("train", "val"))
    train_videos, val_videos = videos["train"], videos["val"]
    resolve_classes(config, classes, root)
    log.info("%s: %d training and %d validation videos, %d classes", root, len(train_videos), len(val_videos),
             len(classes))
    augment = sampling.TrainAugment(
        data_cfg.crop_size, data_cfg.scale_jitter, area=(data_cfg.jitter_min_area, data_cfg.jitter_max_area),
        aspect=(data_cfg.jitter_min_aspect,
                data_cfg.jitter_max_aspect), short_side=data_cfg.train_short_side, flip=data_cfg.flip,
    )
    train_set = data.TrainClips(train_videos, data_cfg.clip_frames, data_cfg.frame_stride, augment)
    if data_cfg.max_eval_videos is not None:
        val_videos = val_videos[: data_cfg.max_eval_videos]
    model = build_model(config)
    num_classes = config.model.num_classes
    return Task(
        model=model,
        train_set=train_set,
        evaluate=VideoEvaluator(val_videos, data_cfg, num_classes),
        primary_metric="top1",
        collate_fn=collate_clips,
    )


def collate_clips(samples: list) -> dict:
    """TrainClips samples (clip uint8 (3, T, H, W), label) -> the classifier's batch {"image", "label"}."""
    clips, labels = zip(*samples)
    return {"image": torch.stack(clips), "label": torch.tensor(labels, dtype=torch.long)}


class EvalVideos(Dataset):
    """Per video: the frames the evaluation views need, already at the evaluation short side (decoded in a
    DataLoader worker), or the reason it is skipped."""

    def __init__(self, videos: list, data_cfg: VideoDataConfig):
        self.videos = videos
        self.data_cfg = data_cfg

    def __len__(self):
        return len(self.videos)

    def __getitem__(self, index):
        video = self.videos[index]
        try:
            frames, num_frames = decode_eval_frames(video.path, self.data_cfg)
        except data.UnreadableVideo as error:
            return {"path": str(video.path), "error": str(error)}
        return {"path": str(video.path), "label": video.label, "num_frames": num_frames, "frames": frames}


def decode_eval_frames(path, data_cfg: VideoDataConfig) -> tuple:
    """({index: uint8 (H, W, 3)} at data_cfg.eval_short_side, the frames the evaluation views need; the video's
    frame count). Raises data.UnreadableVideo when it cannot be decoded or is shorter than a clip."""
    with data.VideoReader(path) as reader:
        num_frames = reader.num_frames
        if num_frames < data_cfg.clip_frames:
            raise data.UnreadableVideo(f"too short: {num_frames} frames, a clip needs {data_cfg.clip_frames}")
        indices = sampling.eval_frame_indices(num_frames, data_cfg.clip_frames, data_cfg.frame_stride,
                                              sampling.views_for(data_cfg.eval_views)[0])
        return reader.decode(indices, short_side=data_cfg.eval_short_side), num_frames


class VideoEvaluator:
    """The training run's evaluator: evaluate_videos over `videos`, with its loader built at the first call and kept,
    so its decoding workers persist between evaluations (no worker start-up per evaluation, as
    engine.classification.TopKEvaluator), until `close` (the trainer calls it when the run ends or fails)."""

    def __init__(self, videos: list, data_cfg: VideoDataConfig, num_classes: int):
        self.videos = videos
        self.data_cfg = data_cfg
        self.num_classes = num_classes
        self.loader = None

    def __call__(self, model: nn.Module) -> dict:
        if self.loader is None:
            self.loader = video_eval_loader(self.videos, self.data_cfg, persistent=True)
        return evaluate_videos(model, self.videos, self.data_cfg, self.num_classes, self.loader)

    def close(self) -> None:
        """Shut the kept loader's workers down (the next call starts new ones)."""
        close_loader(self.loader)
        self.loader = None


def video_eval_loader(videos: list, data_cfg: VideoDataConfig, persistent: bool = False):
    """This rank's part of `videos` as EvalVideos items, one video per item (batch_size=None), not pinned: an item
    is a whole decoded video."""
    return eval_loader(EvalVideos(videos, data_cfg), batch_size=None, num_workers=data_cfg.num_workers,
                       persistent=persistent)


def evaluate_videos(model: nn.Module, videos: list, data_cfg: VideoDataConfig, num_classes: int,
                    loader=None) -> dict:
    """30-view (or `data_cfg.eval_views`) accuracy of `model(batch)`'s logits (engine/task.py's contract; a
    Classifier): softmax averaged over a video's views, top-1/top-5 per video (engine.classification.TopK), summed
    over ranks. Each rank evaluates a contiguous part of the videos (engine.loader.eval_loader; `loader`: a kept
    video_eval_loader of the same videos, else a new one); unreadable or too-short ones are skipped and counted.
    Returns {"top1", "top5", "videos", "skipped"} (floats).

    Raises UserError when no video could be evaluated.
    """
    device = model_device(model)
    loader = loader if loader is not None else video_eval_loader(videos, data_cfg)
    topk = TopK(num_classes, device)
    skipped = 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for item in loader:
            if "error" in item:
                skipped += 1
                log.warning("skipping video %s: %s (%d skipped so far in this evaluation)", item["path"],
                            item["error"], skipped)
                continue
            probs = video_probabilities(model, item["frames"], item["num_frames"], data_cfg, device)
            topk.update(probs[None], torch.tensor([item["label"]], device=device))
    model.train(was_training)
    counts = all_reduce_sum(torch.cat([topk.counts(), torch.tensor([skipped], dtype=torch.float64, device=device)]))
    *topk_counts, skipped = counts.cpu().tolist()
    evaluated = topk_counts[-1]
    if evaluated == 0:
        raise UserError(f"no validation video could be evaluated ({int(skipped)} skipped)")
    return {**fractions(topk_counts), "videos": evaluated, "skipped": skipped}


def video_probabilities(model: nn.Module, frames: dict, num_frames: int, data_cfg: VideoDataConfig,
                        device: torch.device) -> torch.Tensor:
    """The sum over a video's evaluation views (data_cfg.eval_views) of the softmax of `model`'s logits:
    float32 (classes,) on `device`. frames: {index: uint8 (H, W, 3)} at data_cfg.eval_short_side, the indices of
    sampling.eval_frame_indices."""
    num_clips, num_crops = sampling.views_for(data_cfg.eval_views)
    probs = 0.0
    views = sampling.eval_views(frames, num_frames, data_cfg.clip_frames, data_cfg.frame_stride, num_clips, num_crops,
                                data_cfg.eval_crop_size)
    for batch in _batched(views, data_cfg.eval_batch_views):
        logits = model({"image": torch.stack(batch).to(device)})
        probs = probs + logits.float().softmax(1).sum(0)
    return probs


def read_video(path, config: VideoConfig) -> dict:
    """{"frames", "num_frames"}: the frames a video's evaluation views need, at data.eval_short_side (as the
    evaluator decodes them). Raises DataError naming `path` when it cannot be decoded or is too short."""
    try:
        frames, num_frames = decode_eval_frames(path, config.data)
    except data.UnreadableVideo as error:
        raise DataError(f"cannot read video {path}: {error}") from None
    return {"frames": frames, "num_frames": num_frames}


def predict(model: nn.Module, config: VideoConfig, video: dict) -> torch.Tensor:
    """The class probabilities (classes,) of a video: softmax averaged over its evaluation views, as evaluated."""
    probs = video_probabilities(model, video["frames"], video["num_frames"], config.data, model_device(model))
    return (probs / config.data.eval_views).cpu()  # views_for: clips x crops = eval_views


def class_names(config: VideoConfig) -> tuple:
    """(names, where from): the run's data.class_names (filled in when it was built) when as many as the model's
    outputs; for runs saved before that, the training classes of data.root when readable; else (None, why), and
    predictions name classes by index."""
    names = config.data.class_names
    where = "data.class_names of the run's config"
    if names is None:
        try:
            _, names = list_data(config, Path(config.data.root), ("train",))
        except (OSError, TypeError, UserError) as error:
            return None, f"indices: the classes of data.root={config.data.root} cannot be read ({type(error).__name__})"
        where = f"the training classes of {config.data.root}"
    if len(names) != config.model.num_classes:
        return None, f"indices: {where} holds {len(names)} classes, the model {config.model.num_classes} outputs"
    return tuple(str(name) for name in names), where


# predict: videos in, top-5 classes with their view-averaged probabilities out (rs_transfer/predictor.py)
PREDICTOR = Predictor(read=read_video, predict=predict, write=write_top5, class_names=class_names,
                      suffixes=data.VIDEO_SUFFIXES)


def _batched(items, size: int):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# The family's declaration (rs_transfer/families.py): what `runs`, `predict`, `evaluate` and `export` read.
TASK = TaskDeclaration(name="video", family="video", config=VideoConfig, build=build_task, build_model=build_model,
                       predictor=PREDICTOR, metric="top1", sample_unit="clips",
                       eval_size=lambda config: config.data.eval_crop_size)
