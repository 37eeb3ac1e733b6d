"""The video task: its config schema (every Table 6 switch is a field), the Task it hands the engine, the 30-view
evaluator, and the `video train` / `video eval` commands.

Table 6's switches and where they live: FC dropout `model.drop_rate`, label smoothing `train.label_smoothing`,
stochastic depth `model.drop_path_rate`, EMA `train.ema_decay`, weight decay `train.weight_decay`, epochs
`train.epochs`, scale jittering `data.scale_jitter`, SE and ResNet-D the model name's suffixes as in the 2D zoo
(`resnet50` -> `resnet50-se` -> `rs50`), plus `model.temporal_kernels` ("cvrl" or "rs") and `model.self_gating`.
"""

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from rs_transfer.config import (
    ConfigError, DataConfig, ModelConfig, RunConfig, above, at_least, checked, fraction, load_config, one_of, ordered,
)
from rs_transfer.engine.device import model_device
from rs_transfer.engine.loader import eval_loader
from rs_transfer.engine.task import Task
from rs_transfer.engine.write_once import write_once
from rs_transfer.errors import UserError
from rs_transfer.files import atomic_write_json, make_dir
from rs_transfer.models.normalize import Normalize
from rs_transfer.models.resnet3d_rs import ResNet3d, inflate_2d
from rs_transfer.video import data, sampling, synthetic

log = logging.getLogger(__name__)


@dataclass
class VideoModelConfig(ModelConfig):
    name: str = "rs50"  # 2D zoo grammar: rs<depth> = SE + ResNet-D; resnet<depth>[-se][-d] for the ladder
    num_classes: Optional[int] = checked(None, at_least(1))  # None: the training split's classes (400 for K400)
    temporal_kernels: str = checked("rs", one_of("rs", "cvrl"))  # "rs": kt 1,1,3,3 per stage; "cvrl": CVRL's per-block lists
    self_gating: bool = False  # S3D-G gating in each stage's last block (not in Table 6)
    stem_pool: str = checked("max", one_of("max", "conv"))  # "max" (3D Model Garden) or "conv" (the 2D ResNet-RS stem conv; exact inflation)
    avg_down: bool = False  # 2D ResNet-D's average-pool shortcut instead of the 3D strided 1x1x1 conv
    inflate_from: Optional[str] = None  # a 2D zoo checkpoint to inflate (same model name, 2D)
    inflate: str = checked("mean", one_of("mean", "centre"))  # "mean" (I3D: kernel / kt on every tap) or "centre" (middle tap only)


@dataclass
class VideoDataConfig(DataConfig):
    RELATIONS = (ordered("jitter_min_area", "jitter_max_area"), ordered("jitter_min_aspect", "jitter_max_aspect"))

    clip_frames: int = checked(32, at_least(1))
    frame_stride: int = checked(2, at_least(1))
    crop_size: int = checked(224, at_least(1))
    scale_jitter: bool = True  # random resized crop of the whole clip; off: short side + random crop
    jitter_min_area: float = checked(0.08, fraction(closed_high=True, open_low=True))
    jitter_max_area: float = checked(1.0, fraction(closed_high=True, open_low=True))
    jitter_min_aspect: float = checked(0.5, above(0))
    jitter_max_aspect: float = checked(2.0, above(0))
    flip: bool = True  # random horizontal flip (off for data whose labels are left/right motion)
    train_short_side: int = checked(256, at_least(1))  # without scale jittering
    eval_short_side: int = checked(256, at_least(1))
    eval_crop_size: int = checked(256, at_least(1))
    eval_views: int = checked(30, at_least(1))  # 10 clips x 3 crops; 3 = 1 x 3, 1 = centre clip and crop
    eval_batch_views: int = checked(6, at_least(1))  # views per forward pass
    max_eval_videos: Optional[int] = checked(None, at_least(1))  # evaluate the first N validation videos only (quick looks)
    synthetic: bool = False  # write the moving-square dataset to data.root first (when it is not there)


@dataclass
class VideoConfig(RunConfig):
    model: VideoModelConfig = field(default_factory=VideoModelConfig)
    data: VideoDataConfig = field(default_factory=VideoDataConfig)
    output_dir: str = "runs/video"


class VideoClassifier(nn.Module):
    """The engine's model: a batch (clips, labels) in, {"loss", "accuracy"} out. The network is `net`.

    Clips are uint8 (N, 3, T, H, W) as the loader ships them, converted and normalised here on the device
    (models.normalize.Normalize, the zoo's one ImageNet mean/std).
    """

    def __init__(self, net: ResNet3d, label_smoothing: float):
        super().__init__()
        self.normalize = Normalize()
        self.net = net
        self.label_smoothing = label_smoothing

    def forward(self, batch):
        clips, labels = batch
        logits = self.net(self.normalize(clips))
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
        return {"loss": loss, "accuracy": (logits.argmax(1) == labels).float().mean()}


def build_net(config: VideoConfig) -> ResNet3d:
    m = config.model
    if m.num_classes is None:
        raise ValueError("model.num_classes is unset: resolve_num_classes sets it from the data before building")
    net = ResNet3d(
        m.name, num_classes=m.num_classes, temporal_kernels=m.temporal_kernels, self_gating=m.self_gating,
        stem_pool=m.stem_pool, avg_down=m.avg_down, drop_rate=m.drop_rate, drop_path_rate=m.drop_path_rate,
        drop_path_schedule=m.drop_path_schedule, zero_init_last=m.zero_init_last, bn_momentum=m.bn_momentum,
        init=m.init,
    )
    if m.inflate_from is not None and m.weights is not None:
        raise ConfigError("give model.inflate_from (a 2D checkpoint) or model.weights (a 3D one), not both")
    if m.inflate_from is not None:
        from rs_transfer.models.weights import read_state_dict

        skipped = inflate_2d(net, read_state_dict(m.inflate_from), mode=m.inflate)
        log.info("inflated %s into the 3D %s (%s); 2D keys left out: %s", m.inflate_from, m.name, m.inflate,
                 ", ".join(skipped) or "none")
    if m.weights is not None:
        load_3d_weights(net, m.weights)
    return net


def load_3d_weights(net: ResNet3d, path: str) -> None:
    """A 3D checkpoint of ours (`video train`'s checkpoints or final.pt; EMA weights preferred), strictly: keys,
    shapes and float-ness (WeightsError naming them otherwise)."""
    from rs_transfer.models.weights import check_fit, read_state_dict

    state = read_state_dict(path)  # drops the VideoClassifier's `net.` and any DDP/compile prefixes
    check_fit(path, state, net.state_dict(), what=f"the 3D {type(net).__name__} built from the config",
              hint="; check model.name, model.num_classes, model.temporal_kernels and model.self_gating")
    net.load_state_dict(state)


def prepare_root(config: VideoConfig) -> Path:
    if config.data.root is None:
        raise ConfigError("data.root is not set: give data.root=/path/to/kinetics400 (see docs/video.md)")
    root = Path(config.data.root)
    if config.data.synthetic:  # written once, atomically; a folder that holds data is used as it is
        write_once(root, lambda folder: synthetic.write_dataset(folder, "folders", seed=config.seed))
    return root


def resolve_num_classes(config: VideoConfig, classes: list, root: Path) -> None:
    """Set `config.model.num_classes` to the training split's class count when unset (so the saved run config
    holds the number); raise ConfigError when it is set to another count."""
    if config.model.num_classes is None:
        config.model.num_classes = len(classes)
        log.info("model.num_classes=%d: the training classes under %s", len(classes), root)
    elif config.model.num_classes != len(classes):
        raise ConfigError(f"model.num_classes={config.model.num_classes} but {root} has {len(classes)} training "
                          "classes (leave model.num_classes unset to take the data's count)")


def build_task(config: VideoConfig) -> Task:
    root = prepare_root(config)
    d = config.data
    videos, classes = data.list_splits(root, ("train", "val"))
    train_videos, val_videos = videos["train"], videos["val"]
    resolve_num_classes(config, classes, root)
    log.info("%s: %d training and %d validation videos, %d classes", root, len(train_videos), len(val_videos),
             len(classes))
    augment = sampling.TrainAugment(
        d.crop_size, d.scale_jitter, area=(d.jitter_min_area, d.jitter_max_area),
        aspect=(d.jitter_min_aspect, d.jitter_max_aspect), short_side=d.train_short_side, flip=d.flip,
    )
    train_set = data.TrainClips(train_videos, d.clip_frames, d.frame_stride, augment)
    if d.max_eval_videos is not None:
        val_videos = val_videos[: d.max_eval_videos]
    model = VideoClassifier(build_net(config), config.train.label_smoothing)
    return Task(
        model=model,
        train_set=train_set,
        evaluate=lambda m: evaluate_videos(m.net, val_videos, d),
        primary_metric="top1",
    )


class EvalVideos(Dataset):
    """Per video: the frames the evaluation views need, already at the evaluation short side (decoded in a
    DataLoader worker), or the reason it is skipped."""

    def __init__(self, videos: list, d: VideoDataConfig):
        self.videos = videos
        self.d = d
        self.num_clips, _ = sampling.views_for(d.eval_views)

    def __len__(self):
        return len(self.videos)

    def __getitem__(self, index):
        video = self.videos[index]
        d = self.d
        try:
            with data.VideoReader(video.path) as reader:
                num_frames = reader.num_frames
                if num_frames < d.clip_frames:
                    raise data.UnreadableVideo(f"too short: {num_frames} frames, a clip needs {d.clip_frames}")
                indices = sampling.eval_frame_indices(num_frames, d.clip_frames, d.frame_stride, self.num_clips)
                frames = reader.decode(indices, short_side=d.eval_short_side)
        except data.UnreadableVideo as error:
            return {"path": str(video.path), "error": str(error)}
        return {"path": str(video.path), "label": video.label, "num_frames": num_frames, "frames": frames}


def evaluate_videos(net: nn.Module, videos: list, d: VideoDataConfig) -> dict:
    """30-view (or `d.eval_views`) accuracy: softmax averaged over a video's views, top-1/top-5 per video,
    summed over ranks. Each rank evaluates a contiguous part of the videos (engine.loader.eval_loader); unreadable
    or too-short ones are skipped and counted."""
    from rs_transfer.engine.distributed import all_reduce_sum

    num_clips, num_crops = sampling.views_for(d.eval_views)
    device = model_device(net)
    normalize = Normalize().to(device)  # views leave the loader as uint8
    # One video per item (batch_size=None), not pinned: an item is a whole decoded video.
    loader = eval_loader(EvalVideos(videos, d), batch_size=None, num_workers=d.num_workers)
    counts = torch.zeros(4, dtype=torch.float64)  # top-1 hits, top-5 hits, evaluated, skipped
    was_training = net.training
    net.eval()
    with torch.no_grad():
        for item in loader:
            if "error" in item:
                counts[3] += 1
                log.warning("skipping video %s: %s (%d skipped so far in this evaluation)", item["path"],
                            item["error"], int(counts[3]))
                continue
            probs = 0.0
            views = sampling.eval_views(item["frames"], item["num_frames"], d.clip_frames, d.frame_stride,
                                        num_clips, num_crops, d.eval_crop_size)
            for batch in _batched(views, d.eval_batch_views):
                logits = net(normalize(torch.stack(batch).to(device)))
                probs = probs + logits.float().softmax(1).sum(0)
            top = probs.topk(min(5, probs.numel())).indices.tolist()
            counts[0] += top[0] == item["label"]
            counts[1] += item["label"] in top
            counts[2] += 1
    net.train(was_training)
    hits1, hits5, evaluated, skipped = all_reduce_sum(counts.to(device)).cpu().tolist()
    if evaluated == 0:
        raise UserError(f"no validation video could be evaluated ({int(skipped)} skipped)")
    return {"top1": hits1 / evaluated, "top5": hits5 / evaluated, "videos": evaluated, "skipped": skipped}


def _batched(items, size: int):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def run_train(config_path: str, overrides: list) -> dict:
    from rs_transfer.engine.distributed import seed_everything
    from rs_transfer.engine.trainer import train

    config = load_config(VideoConfig, config_path, overrides)
    prepare_root(config)
    seed_everything(config.seed)  # before the model and anything else random is built: same seed, same run
    # build_task fills in an unset model.num_classes, before train() saves the run's config.yaml.
    metrics = train(config, build_task(config))
    log.info("final: %s", json.dumps(metrics))
    return metrics


def find_run_config(checkpoint: Path) -> Path:
    for folder in (checkpoint.parent, checkpoint.parent.parent):
        if (folder / "config.yaml").is_file():
            return folder / "config.yaml"
    raise ConfigError(f"no config.yaml beside {checkpoint} or in its parent folder: give --config FILE")


def run_eval(checkpoint: str, views: int, config_path: str | None, overrides: list) -> dict:
    """Evaluate a `video train` checkpoint on the validation split; the model comes from the run's config.

    Returns the metrics, also logged and written to OUTPUT_DIR/eval_{views}views.json. Raises FileWriteError (one
    line naming the folder or file and the OS's reason) when output_dir cannot be written.
    """
    from rs_transfer.engine.distributed import init_distributed, is_main

    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise UserError(f"checkpoint not found: {checkpoint}")
    config = load_config(VideoConfig, config_path or find_run_config(checkpoint),
                         [f"data.eval_views={views}", *overrides])
    config.model.inflate_from = None
    config.model.weights = str(checkpoint)
    info = init_distributed(config.train.device)
    root = prepare_root(config)
    val_videos, classes = data.list_videos(root, "val")
    resolve_num_classes(config, classes, root)
    net = build_net(config).to(info.device)
    if config.data.max_eval_videos is not None:
        val_videos = val_videos[: config.data.max_eval_videos]
    metrics = {"views": views, "checkpoint": str(checkpoint),
               **evaluate_videos(net, val_videos, config.data)}
    if is_main():
        # Logged before writing, so that an unwritable output_dir does not lose an evaluation that took hours.
        log.info("eval: %s", json.dumps(metrics))
        out = make_dir(config.output_dir, "output_dir", " (the metrics are in the log line above)")
        atomic_write_json(out / f"eval_{views}views.json", metrics)
    return metrics
