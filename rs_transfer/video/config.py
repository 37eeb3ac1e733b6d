"""The video run's config schema: every Table 6 switch is a field.

Table 6's switches and where they live: FC dropout `model.drop_rate`, label smoothing `train.label_smoothing`,
stochastic depth `model.drop_path_rate`, EMA `train.ema_decay`, weight decay `train.weight_decay`, epochs
`train.epochs`, scale jittering `data.scale_jitter`, SE and ResNet-D the model name's suffixes as in the 2D zoo
(`resnet50` -> `resnet50-se` -> `rs50`), plus `model.temporal_kernels` ("cvrl" or "rs") and `model.self_gating`.
"""

from dataclasses import dataclass, field
from typing import Optional

from rs_transfer.config import (
    MAX_BATCH, MAX_CLASSES, MAX_FRAMES, MAX_PIXELS, DataConfig, ModelConfig, RunConfig, above, at_least, at_most,
    checked, fraction, one_of, ordered,
)


@dataclass
class VideoModelConfig(ModelConfig):
    name: str = "rs50"  # 2D zoo grammar: rs<depth> = SE + ResNet-D; resnet<depth>[-se][-d] for the ladder
    num_classes: Optional[int] = checked(None, at_least(1), at_most(MAX_CLASSES))  # None: the training split's classes (400 for K400)
    temporal_kernels: str = checked("rs", one_of("rs", "cvrl"))  # "rs": kt 1,1,3,3 per stage; "cvrl": CVRL's per-block lists
    self_gating: bool = False  # S3D-G gating in each stage's last block (not in Table 6)
    stem_pool: str = checked("max", one_of("max", "conv"))  # "max" (3D Model Garden) or "conv" (the 2D ResNet-RS stem conv; exact inflation)
    avg_down: bool = False  # 2D ResNet-D's average-pool shortcut instead of the 3D strided 1x1x1 conv
    inflate_from: Optional[str] = None  # a 2D zoo checkpoint to inflate (same model name, 2D)
    inflate: str = checked("mean", one_of("mean", "centre"))  # "mean" (I3D: kernel / kt on every tap) or "centre" (middle tap only)


@dataclass
class VideoDataConfig(DataConfig):
    RELATIONS = (ordered("jitter_min_area", "jitter_max_area"), ordered("jitter_min_aspect", "jitter_max_aspect"))

    clip_frames: int = checked(32, at_least(1), at_most(MAX_FRAMES))
    frame_stride: int = checked(2, at_least(1))
    crop_size: int = checked(224, at_least(1), at_most(MAX_PIXELS))
    scale_jitter: bool = True  # random resized crop of the whole clip; off: short side + random crop
    jitter_min_area: float = checked(0.08, fraction(closed_high=True, open_low=True))
    jitter_max_area: float = checked(1.0, fraction(closed_high=True, open_low=True))
    jitter_min_aspect: float = checked(0.5, above(0))
    jitter_max_aspect: float = checked(2.0, above(0))
    flip: bool = True  # random horizontal flip (off for data whose labels are left/right motion)
    train_short_side: int = checked(256, at_least(1), at_most(MAX_PIXELS))  # without scale jittering
    eval_short_side: int = checked(256, at_least(1), at_most(MAX_PIXELS))
    eval_crop_size: int = checked(256, at_least(1), at_most(MAX_PIXELS))
    eval_views: int = checked(30, at_least(1), at_most(MAX_BATCH))  # 10 clips x 3 crops; 3 = 1 x 3, 1 = centre clip and crop
    eval_batch_views: int = checked(6, at_least(1), at_most(MAX_BATCH))  # views per forward pass
    max_eval_videos: Optional[int] = checked(None, at_least(1))  # evaluate the first N validation videos only (quick looks)
    synthetic: bool = False  # write the moving-square dataset to data.root first (when it is not there)
    synthetic_layout: str = checked("folders", one_of("folders", "csv", "list"))  # the layout data.synthetic writes
    # Your own videos as a `path label` list (SlowFast, mmaction2; docs/video.md). Relative paths are under data.root.
    train_list: Optional[str] = None  # None: ROOT/train.csv or ROOT/train.txt
    val_list: Optional[str] = None  # None: ROOT/val.csv or ROOT/val.txt
    class_names_file: Optional[str] = None  # one name per line, in index order; None: ROOT/classes.txt when there
    # The class names, index order; None: from the data (folders, labels, names file). Filled in when the run is
    # built, so the run's config.yaml carries them to `predict`; set, the data must agree.
    class_names: Optional[list] = None


@dataclass
class VideoConfig(RunConfig):
    model: VideoModelConfig = field(default_factory=VideoModelConfig)
    data: VideoDataConfig = field(default_factory=VideoDataConfig)
    output_dir: str = "runs/video"
