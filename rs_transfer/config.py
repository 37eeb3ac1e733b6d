"""Typed run configs: dataclass defaults, then a YAML file (which may name one `base:` file), then `key=value`.

Every command has a schema: a dataclass built from the sections below (a task adds its own sections by
subclassing `RunConfig`). Unknown keys and values of the wrong type are errors that name the key and suggest
the closest valid one. A value that makes no sense (a negative learning rate, an EMA decay of 1, zero epochs)
is an error too: each field declares its allowed range where it is declared, `lr: float = checked(0.1, at_least(0))`,
and `load_config` checks every field of every section. The resolved config is saved with every run as
`OUTPUT_DIR/config.yaml`, with the git commit it ran from, and loads back as it is.

The YAML configs ship inside the package (`rs_transfer/configs/`, package data), so an installed copy finds them
from any folder: `find_config` turns a file path or a name like `pretrain/rs50_i160.yaml` into the file.
"""

import dataclasses
import difflib
import importlib.resources
import math
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar, Union

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from rs_transfer.data.text import ENCODING as TEXT_ENCODING
from rs_transfer.errors import UserError, has_control_character
from rs_transfer.files import atomic_write_text, make_dir

T = TypeVar("T")


class ConfigError(UserError):
    pass


# Bounds of every YAML the toolkit reads (config files, overrides, a run's config.yaml): ours are a few KB, three
# levels deep and a few hundred values. Without them a YAML "billion laughs" (aliases of aliases) grows to GBs while
# OmegaConf copies it, and deep nesting ends in a RecursionError.
MAX_YAML_BYTES = 1 << 20
MAX_YAML_DEPTH = 32
MAX_YAML_VALUES = 100_000  # nodes once every alias is expanded


def check_yaml(text: str, where: str) -> None:
    """Raise ConfigError naming `where` when YAML `text` is larger, deeper or (aliases expanded) bigger than the
    bounds above, or is not YAML. Only composes the text (no value is built, no tag is constructed)."""
    if len(text.encode("utf-8", "replace")) > MAX_YAML_BYTES:
        raise ConfigError(f"{where} is larger than {MAX_YAML_BYTES >> 20} MiB: not a config")
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
    except RecursionError:
        raise ConfigError(f"{where} is nested too deeply (more than {MAX_YAML_DEPTH} levels)") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{where} is not valid YAML: {' '.join(str(error).split())}") from None
    finally:
        loader.dispose()
    pending, values = [(root, 1)] if root is not None else [], 0
    while pending:  # iterative: aliases make a node reachable many times, and each time counts
        node, depth = pending.pop()
        values += 1
        if values > MAX_YAML_VALUES or depth > MAX_YAML_DEPTH:
            what = f"nested more than {MAX_YAML_DEPTH} levels deep" if depth > MAX_YAML_DEPTH else \
                f"more than {MAX_YAML_VALUES} values once its aliases (*name) are expanded"
            raise ConfigError(f"{where} holds {what}: not a config")
        if isinstance(node, yaml.SequenceNode):
            pending += [(child, depth + 1) for child in node.value]
        elif isinstance(node, yaml.MappingNode):
            _check_unique_keys(node, where)
            pending += [(part, depth + 1) for pair in node.value for part in pair]


def _check_unique_keys(node: yaml.MappingNode, where: str) -> None:
    """Raise ConfigError when a mapping names a key twice: YAML loaders keep the last and drop the first silently
    (a second `train:` section would discard every setting of the first)."""
    seen = {}
    for key, _ in node.value:
        if isinstance(key, yaml.ScalarNode) and key.value != "<<":
            line = key.start_mark.line + 1
            if key.value in seen:
                raise ConfigError(f"{where} has key {key.value!r} twice (lines {seen[key.value]} and {line}): YAML "
                                  "would keep the second alone; merge them into one")
            seen[key.value] = line


def read_yaml(text: str, where: str):
    """The value of YAML `text` (safe: plain data only, no tag builds an object), within the bounds of `check_yaml`.
    Raises ConfigError naming `where`."""
    check_yaml(text, where)
    try:
        return yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError, ValueError) as error:  # ValueError: an int of over 4300 digits
        raise ConfigError(f"{where} is not valid YAML: {' '.join(str(error).split())}") from None


def _literal(tree):
    """`tree` (plain YAML data) with every "${" escaped, so OmegaConf keeps it as text: a study named S${oc.env:X}
    or a folder with "${" in its name stays what it is. No config key of ours asks for interpolation."""
    if isinstance(tree, str):  # OmegaConf reads \${ as a literal ${ and \\ before ${ as a literal \
        return re.sub(r"(\\*)\$\{", lambda found: found.group(1) * 2 + "\\${", tree)
    if isinstance(tree, dict):
        return {key: _literal(value) for key, value in tree.items()}
    if isinstance(tree, list):
        return [_literal(value) for value in tree]
    return tree


@dataclass(frozen=True)
class Check:
    """An allowed range: `ok(value)` is True when the value is allowed; `rule` says what is, for the error.
    `number`: the rule compares numbers, so the value must be one (validate checks it first: a field typed plain
    `list`, whose items the config system does not convert, may hold a string, None or a nested list)."""

    rule: str
    ok: Callable[[Any], bool]
    number: bool = False


def at_least(low) -> Check:
    return Check(f">= {low}", lambda v: v >= low, number=True)


# Upper bounds of sizes and counts: far beyond any real run, low enough that a typo (an extra zero, 1e9) is an
# error naming the key instead of a MemoryError, or a run that allocates for hours before its first step.
MAX_PIXELS = 16384  # an image side, a crop, a resize target
MAX_BATCH = 1 << 20  # images (clips, views) in one batch
MAX_STEPS = 10 ** 9  # optimiser steps, and step intervals
MAX_EPOCHS = 10 ** 6
MAX_WORKERS = 1024  # loader processes per training process
MAX_CHANNELS = 1 << 16  # the width of a head layer
MAX_FRAMES = 4096  # frames of one clip
MAX_CLASSES = 100_000  # classifier outputs (ImageNet-21k has 21,841); --synthetic writes a folder per class
MAX_SEED = 2 ** 32 - 1  # numpy's seeds are 32-bit


def at_most(high) -> Check:
    return Check(f"<= {high}", lambda v: v <= high, number=True)


def above(low) -> Check:
    return Check(f"> {low}", lambda v: v > low, number=True)


def fraction(closed_high: bool = False, open_low: bool = False) -> Check:
    """In [0, 1) by default; `closed_high` allows 1, `open_low` excludes 0."""
    low, high = ("(" if open_low else "["), ("]" if closed_high else ")")
    return Check(f"in {low}0, 1{high}", lambda v: (v > 0 if open_low else v >= 0) and (v <= 1 if closed_high else v < 1),
                 number=True)


def auto_or_int() -> Check:
    """A count that may also be "auto" (data.num_workers); list it before `or_auto` ranges, so a typo reads as one."""
    return Check("'auto' or a whole number", lambda v: v == "auto" or type(v) is int)


def or_auto(check: Check) -> Check:
    """`check` on numbers; "auto" passes (its value is decided where it is used)."""
    return Check(check.rule, lambda v: v == "auto" or check.ok(v))


def one_of(*choices) -> Check:
    return Check("one of " + ", ".join(map(str, choices)), lambda v: v in choices)


def checked(default, *checks: Check, factory=None):
    """A dataclass field with allowed ranges; None (for Optional fields) is always allowed."""
    if factory is not None:
        return field(default_factory=factory, metadata={"checks": checks})
    return field(default=default, metadata={"checks": checks})


def ordered(low_key: str, high_key: str, strict: bool = False):
    """A relation between two fields of one section: `low_key` <= `high_key` (< when strict). A section lists its
    relations in a class attribute `RELATIONS = (ordered("scale_min", "scale_max"), ...)`."""
    def check(section, prefix: str) -> None:
        low, high = getattr(section, low_key), getattr(section, high_key)
        if low is not None and high is not None and (low >= high if strict else low > high):
            raise ConfigError(f"{prefix}{low_key}={low!r} and {prefix}{high_key}={high!r} make no sense together: "
                              f"{low_key} must be {'<' if strict else '<='} {high_key}")
    return check


def _as_typed(value) -> str:
    """A value as a user types it in an override: true/false, not True/False."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def only_with(switch: str, on, *keys: str):
    """A relation: `keys` of a section act only when `switch` is `on` (a value, or a tuple of values): one of them
    set away from its default while the switch is off is a ConfigError, not a silent no-op (say, pseudo-labels
    given to a run that does not co-train)."""
    allowed = on if isinstance(on, tuple) else (on,)

    def check(section, prefix: str) -> None:
        if getattr(section, switch) in allowed:
            return
        defaults = {f.name: f.default_factory() if f.default is dataclasses.MISSING else f.default
                    for f in dataclasses.fields(section)}
        for key in keys:
            if getattr(section, key) != defaults[key]:
                wanted = " or ".join(_as_typed(v) for v in allowed)
                raise ConfigError(f"{prefix}{key}={_as_typed(getattr(section, key))} has no effect with "
                                  f"{prefix}{switch}={_as_typed(getattr(section, switch))}: set {prefix}{switch}="
                                  f"{wanted} to use it, or leave {prefix}{key} out")
    return check


def validate(config, prefix: str = "") -> None:
    """Check every field of `config` and its sections against its declared ranges, then each section's
    RELATIONS between fields; ConfigError names the key(s)."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            validate(value, key + ".")
            continue
        if value is None:
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(v, str) and has_control_character(v) for v in values):
            # a newline in output_dir would be folded into a space when config.yaml is read back: another folder
            raise ConfigError(f"{key}={value!r} holds a control character (a newline, tab, ...): paths, names and "
                              "choices are one line of printable text")
        for check in f.metadata.get("checks", ()):
            for v in values:
                if check.number and (isinstance(v, bool) or not isinstance(v, (int, float))):
                    raise ConfigError(f"{key}={value!r} makes no sense here: it must be a number {check.rule}")
                if isinstance(v, float) and not math.isfinite(v) or not check.ok(v):
                    raise ConfigError(f"{key}={value!r} makes no sense here: it must be {check.rule}")
    for relation in getattr(type(config), "RELATIONS", ()):
        relation(config, prefix)


@dataclass
class ModelConfig:
    name: str = "rs50"
    num_classes: Optional[int] = checked(None, at_least(1), at_most(MAX_CLASSES))  # None: inferred from the data (class folders, CSV, the task); set: checked
    weights: Optional[str] = None  # checkpoint file to start from (timm's or ours), read offline
    drop_rate: float = checked(0.0, fraction())  # dropout before the classifier
    drop_path_rate: float = checked(0.0, fraction())  # stochastic depth
    drop_path_schedule: str = checked("stage", one_of("stage", "block"))  # "stage" (official) or "block" (timm)
    zero_init_last: bool = True
    bn_momentum: float = checked(0.1, fraction(closed_high=True))  # PyTorch convention; the RS recipe uses 1.0 with an EMA of BN buffers
    init: str = checked("official", one_of("official", "timm"))
    # Frozen backbone parts (engine/freeze.py): detectron2's FREEZE_AT, 0 nothing, 1 the stem, 2 stem + c2 (layer1),
    # ... 5 the whole backbone; frozen weights leave the optimizer and their BN becomes FrozenBatchNorm.
    freeze_stages: int = checked(0, at_least(0), at_most(5))
    freeze_bn: bool = False  # every backbone BN frozen (statistics and affine), detectron2's FrozenBN for small batches


@dataclass
class DataConfig:
    root: Optional[str] = None
    # Loader processes per training process (they persist across epochs): a count, or "auto", this process's share
    # of the node's cores less one for the trainer (engine/distributed.loader_workers).
    num_workers: Union[int, str] = checked(4, auto_or_int(), or_auto(at_least(0)), or_auto(at_most(MAX_WORKERS)))
    prefetch_factor: int = checked(2, at_least(1), at_most(MAX_BATCH))  # batches each worker loads ahead


# train.optimizer: the names timm's optimizer factory (create_optimizer_v2) builds that the engine offers.
OPTIMIZERS = ("sgd", "adamw", "lamb", "lars")
MOMENTUM_OPTIMIZERS = ("sgd", "lars")  # the ones train.momentum and train.nesterov apply to


def optimizer_settings(section, prefix: str) -> None:
    """train.optimizer is a known name (did-you-mean otherwise); momentum and nesterov apply to sgd and lars only,
    so setting them away from their defaults for adamw or lamb is an error rather than silently ignored; Nesterov
    needs momentum (PyTorch's SGD refuses it with a traceback)."""
    name = section.optimizer
    if name not in OPTIMIZERS:
        close = difflib.get_close_matches(str(name), OPTIMIZERS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{prefix}optimizer={name!r} is not an optimizer here: it must be one of "
                          f"{', '.join(OPTIMIZERS)}{hint}")
    defaults = {f.name: f.default for f in dataclasses.fields(section)}
    if name not in MOMENTUM_OPTIMIZERS:
        for key in ("momentum", "nesterov"):
            if getattr(section, key) != defaults[key]:
                raise ConfigError(f"{prefix}{key}={getattr(section, key)!r} applies to {prefix}optimizer="
                                  f"{' or '.join(MOMENTUM_OPTIMIZERS)}, not {name!r} (its moments use timm's default "
                                  f"betas): leave {prefix}{key} at its default")
    elif section.nesterov and section.momentum == 0:
        raise ConfigError(f"{prefix}nesterov=True needs {prefix}momentum > 0: set {prefix}nesterov=false for plain "
                          f"{name}")


COMPILE_BACKENDS = ("inductor", "aot_eager", "eager", "cudagraphs")  # torch.compile(backend=...)


@dataclass
class TrainConfig:
    RELATIONS = (optimizer_settings,)

    # Length: give exactly one. A step is one optimizer update of `batch_size` images.
    epochs: Optional[int] = checked(None, at_least(1), at_most(MAX_EPOCHS))
    steps: Optional[int] = checked(None, at_least(1), at_most(MAX_STEPS))
    batch_size: int = checked(256, at_least(1), at_most(MAX_BATCH))  # global: per-process batch x processes x grad_accum_steps
    grad_accum_steps: int = checked(1, at_least(1), at_most(MAX_BATCH))
    # Optimizer (timm's create_optimizer_v2): Nesterov SGD by default; peak LR = lr x batch_size / 256 when
    # scale_lr, else lr.
    optimizer: str = "sgd"  # one of OPTIMIZERS (checked by optimizer_settings, with a did-you-mean)
    lr: float = checked(0.1, at_least(0))
    scale_lr: bool = True
    momentum: float = checked(0.9, fraction())  # sgd and lars only
    nesterov: bool = True  # official TF1 ResNet-RS code; sgd and lars only
    weight_decay: float = checked(4e-5, at_least(0))  # coupled L2 for sgd/lars; outside the moments for adamw/lamb
    weight_decay_norm_bias: bool = False  # False: no decay on 1-D parameters (BN/LN/GN scales and shifts, biases)
    # LR multipliers on the backbone (engine/task.py's rule finds it): its LR is lr x backbone_lr_mult (mmengine's
    # lr_mult), and with layer_decay its stage k of 5 (stem 0, c2..c5 1..4; heads 5) gets x layer_decay^(5 - k).
    backbone_lr_mult: float = checked(1.0, at_least(0))
    layer_decay: Optional[float] = checked(None, fraction(closed_high=True, open_low=True))  # None: off
    clip_grad_norm: Optional[float] = checked(None, above(0))  # max global gradient norm; None: no clipping
    # Schedule over optimizer steps: linear warmup to the peak LR, then "cosine" to 0 or "step" decay.
    schedule: str = checked("cosine", one_of("cosine", "step"))
    warmup_epochs: float = checked(0.0, at_least(0), at_most(MAX_EPOCHS))  # give warmup_epochs or warmup_steps, not both
    warmup_steps: int = checked(0, at_least(0), at_most(MAX_STEPS))
    decay_epochs: list[float] = checked(None, at_least(0), at_most(MAX_EPOCHS), factory=list)  # "step": LR x decay_rate at these epochs
    decay_steps: list[int] = checked(None, at_least(0), at_most(MAX_STEPS), factory=list)  # ... or at these steps
    decay_rate: float = checked(0.1, fraction(closed_high=True, open_low=True))
    # Read only by the families with a cross-entropy loss (pretrain, video, cifar100, folder_cls), yet kept here:
    # every run folder's config.yaml (the resolved config, all keys) and the recipe YAMLs set train.label_smoothing,
    # and unknown keys are errors, so moving it would stop every old run from resuming, predicting and listing.
    label_smoothing: float = checked(0.0, fraction())
    # EMA of weights and BN buffers, updated after every step; evaluation uses it when on.
    ema_decay: Optional[float] = checked(None, fraction())  # e.g. 0.9999; None: no EMA
    ema_warmup: bool = True  # official: decay at step t = min(ema_decay, (1 + t) / (10 + t))
    # Speed: autocast, channels-last memory format, torch.compile.
    amp: str = checked("auto", one_of("auto", "bf16", "fp16", "none"))  # "auto": bf16 on GPUs that have it, fp16 (with a GradScaler) on older ones, none on CPU (CPU bf16 is often several times slower); engine/device.resolve_amp
    channels_last: bool = True
    compile: bool = False
    # torch.compile's backend: inductor (code generation, the fast one), or aot_eager / eager to check that a model
    # compiles without generating code (minutes on a CPU for inductor, seconds for these: what the CPU tests use)
    compile_backend: str = checked("inductor", one_of(*COMPILE_BACKENDS))
    sync_bn: bool = False  # SyncBatchNorm across processes (dense tasks with small per-GPU batches)
    find_unused_parameters: bool = False  # DDP option for models that skip parameters in some steps
    device: str = checked("auto", one_of("auto", "cpu", "cuda"))  # "auto" (cuda:LOCAL_RANK when CUDA is available, else cpu), "cpu" or "cuda"
    # Evaluation, checkpoints and logging. Evaluation always runs at the end as well.
    eval_every_epochs: int = checked(1, at_least(0), at_most(MAX_EPOCHS))  # 0: off
    eval_last_epochs: int = checked(0, at_least(0), at_most(MAX_EPOCHS))  # also at the end of each of the last N epochs (the long recipes: 10, with eval_every_epochs 10); 0: off
    eval_every_steps: int = checked(0, at_least(0), at_most(MAX_STEPS))  # 0: off
    checkpoint_every_steps: int = checked(0, at_least(0), at_most(MAX_STEPS))  # also after every evaluation and at the end; 0: only those
    keep_last: int = checked(2, at_least(0))  # step checkpoints kept, besides best.pt; 0: all
    # Early stopping, as the paper does for RS-350/420 @ 320: at the end, put best.pt (the best primary metric) back
    # and report it: final.pt, weights.pth and final_metrics.json are the best checkpoint's, evaluated by the
    # task's report evaluator (pretraining with data.eval_split=minival: on val), else by its evaluator.
    report_best: bool = False
    log_every_steps: int = checked(50, at_least(1), at_most(MAX_STEPS))  # also when non-finite values are checked
    log_every_seconds: float = checked(60.0, above(0))  # rank 0 prints a progress line at least this often (and after the first step)
    resume: Optional[str] = None  # "auto" (newest checkpoint in OUTPUT_DIR/checkpoints, if any) or a file
    # Where scalars go besides metrics.jsonl (always written): wandb and mlflow are extras (engine/trackers.py)
    loggers: list[str] = checked(None, one_of("tensorboard", "wandb", "mlflow"), factory=lambda: ["tensorboard"])


def backbone_lr_settings(config, prefix: str) -> None:
    """train.backbone_lr_mult and train.layer_decay scale the backbone's LRs; model.freeze_stages=5 takes the whole
    backbone out of the optimizer, so either of them set away from its default would be silently ignored: an error
    (as momentum with adamw, optimizer_settings). Fewer frozen stages leave them a trainable part to act on."""
    if config.model.freeze_stages < 5:
        return
    defaults = {f.name: f.default for f in dataclasses.fields(config.train)}
    for key in ("backbone_lr_mult", "layer_decay"):
        value = getattr(config.train, key)
        if value != defaults[key]:
            raise ConfigError(f"{prefix}train.{key}={value!r} has no effect with {prefix}model.freeze_stages=5 (the "
                              f"whole backbone is frozen, out of the optimizer): leave {prefix}train.{key} out, or "
                              "freeze fewer stages")


@dataclass
class RunConfig:
    RELATIONS = (backbone_lr_settings,)

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output_dir: str = "runs/default"
    seed: int = checked(0, at_least(0), at_most(MAX_SEED))


# What may differ between two configs of the same run. LOCATION_KEYS: where things are, on what hardware, how
# often it reports: a finished sweep point run with other values of these is the same point. A resume may also
# change how and how often it evaluates (EVAL_KEYS), the run's length (the schedule then spans the new length) and
# the weights it started from (restored from the checkpoint instead). Any other key changes the run.
LOCATION_KEYS = frozenset({
    "output_dir", "data.root", "data.num_workers", "data.prefetch_factor", "data.synthetic", "data.synthetic_layout",
    "train.resume", "train.device",
    "train.compile", "train.compile_backend", "train.amp", "train.channels_last", "train.find_unused_parameters",
    "train.log_every_steps", "train.log_every_seconds", "train.loggers",
    "train.checkpoint_every_steps", "train.keep_last",
})
EVAL_KEYS = frozenset({
    "train.eval_every_epochs", "train.eval_last_epochs", "train.eval_every_steps", "task.eval_batch_size", "task.det_eval_size",
    "data.eval_image_size", "data.eval_views", "data.eval_batch_views", "data.max_eval_videos",
    "data.eval_short_side", "data.eval_crop_size", "train.report_best",
    # inference of the dense and detection tasks (sliding window, test-time augmentation), depth averaging
    "task.eval_mode", "task.slide_crop", "task.slide_stride", "task.tta", "task.tta_scales", "task.depth_average",
})
RESUME_MAY_CHANGE = LOCATION_KEYS | EVAL_KEYS | {"train.steps", "train.epochs", "model.weights", "model.inflate_from"}
# None in a config means "from the data": it matches any value. A task that reads its classes from the user's data
# (folder_cls, coco_det, folder_seg, video lists) records them into the run's config at build time (`record_inferred`,
# the one door; tests/test_config.py checks no builder writes a config another way), so config.yaml carries them to
# `predict` and `export` without the data.
INFERRED_KEYS = frozenset({"model.num_classes", "task.class_names", "task.category_ids", "data.class_names"})


def record_inferred(config, key: str, value) -> None:
    """The one way a builder writes into a loaded config: `key` (one of INFERRED_KEYS, dotted) set to `value`, what
    the data says, so the run's config.yaml carries it to `predict` and `export`. A value the config sets is the
    builder's to check against the data first, with a message naming both; the data's own form is recorded (e.g. the
    class folders' names as the file system spells them). Raises ValueError for another key (a builder's bug)."""
    if key not in INFERRED_KEYS:
        raise ValueError(f"{key} is not a key inferred from the data ({', '.join(sorted(INFERRED_KEYS))})")
    section, name = key.split(".")
    setattr(getattr(config, section), name, value)


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"train": {"lr": 0.1}} -> {"train.lr": 0.1}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def run_differences(saved: dict, current: dict, may_differ=LOCATION_KEYS, where: str = "in the checkpoint",
                    defaults: dict | None = None) -> list[str]:
    """Keys (outside `may_differ`) whose values differ between two resolved configs (`to_dict`), each as
    "key: OLD <where>, NEW now". `defaults` (`to_dict` of the schema's defaults): a key the saved config lacks
    (added to the schema after it was saved) matches when the current value is its default, as the saved run
    behaved."""
    old, new = flatten(saved), flatten(current)
    default = flatten(defaults) if defaults is not None else {}
    changed = []
    for key in sorted(old.keys() | new.keys()):
        if key in may_differ or old.get(key) == new.get(key):
            continue
        if key in INFERRED_KEYS and (new.get(key) is None or old.get(key) is None):
            continue
        if key not in old and key in default and new.get(key) == default[key]:
            continue
        if key.startswith("task.") and key not in new:
            # Configs saved before each task had its own section (2026-11-30) hold every task's keys; those of
            # other tasks never affected the run, so a finished point or a checkpoint of then still matches.
            continue
        changed.append(f"{key}: {old.get(key)!r} {where}, {new.get(key)!r} now")
    return changed


def packaged_configs() -> Path:
    """The folder of YAML configs shipped in the package. A wheel installs as plain files, so it is a real folder."""
    return Path(importlib.resources.files("rs_transfer") / "configs")


def find_config(name: str | Path, relative_to: Path | None = None) -> Path:
    """The config file `name` stands for: an existing file (relative to `relative_to` when given, else to the
    working folder) is used as it is; otherwise `name` is looked up in the packaged configs, as
    `pretrain/rs50_i160.yaml` or with the leading `configs/` of a source checkout (`configs/pretrain/...`), so
    the commands in the docs work from any folder with any install. ConfigError lists where it looked."""
    given = Path(name)
    candidates = [given if relative_to is None else relative_to / given]
    if not given.is_absolute():
        parts = given.parts[1:] if given.parts[:1] == ("configs",) else given.parts
        candidates.append(packaged_configs().joinpath(*parts))
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    looked = " and ".join(str(candidate) for candidate in candidates)
    raise ConfigError(f"config file not found: {name}{closest_packaged(given)}; looked for {looked}")


def closest_packaged(given: Path) -> str:
    """"; did you mean 'NAME'?" naming the packaged config closest to `given` (a typo of
    downstream/pascal_seg_demo.yaml), or "" when none is close."""
    parts = given.parts[1:] if given.parts[:1] == ("configs",) else given.parts
    if given.is_absolute() or not parts:
        return ""
    root = packaged_configs()
    folder = root.joinpath(*parts[:-1])
    if folder.is_dir():  # the file name compared alone: a shared folder prefix would make every name look close
        close = difflib.get_close_matches(parts[-1], [path.name for path in folder.glob("*.yaml")], n=1, cutoff=0.8)
        close = [Path(*parts[:-1], name).as_posix() for name in close]
    else:
        names = [path.relative_to(root).as_posix() for path in root.rglob("*.yaml")]
        close = difflib.get_close_matches(Path(*parts).as_posix(), names, n=1, cutoff=0.8)
    return f"; did you mean {close[0]!r}?" if close else ""


def string_override(key: str, value) -> str:
    """`key='value'`: an override whose value OmegaConf takes as the string it is. Unquoted, `key=value` is parsed
    as YAML, so `model.weights=timm:` became a dict ({'timm': None}) and a path with ':' or '{' could too. Every
    override the toolkit builds from a path or a name goes through this."""
    text = str(value).replace("'", "''")  # YAML single quotes: '' is one quote
    return f"{key}='{text}'"


def load_config(schema: type[T], path: str | Path | None = None, overrides: list | tuple = ()) -> T:
    """Build a run config: the defaults of `schema`, then the YAML at `path` (a file or a packaged name, see
    `find_config`, after its `base:` chain, the base first), then `key=value` overrides in order; the last wins.

    Args:
        schema: a dataclass type (a `RunConfig` subclass), e.g. `PretrainConfig`.
        path: a YAML file, a packaged name such as "pretrain/rs50_i160.yaml", or None for the defaults alone.
        overrides: "key=value" strings, dotted keys ("train.batch_size=64"), values parsed as YAML.
    Returns: an instance of `schema`, every field typed and checked (`validate`).
    Raises: ConfigError (one line naming the file, override or key) for a missing or unreadable file, a `base:`
        cycle, an unknown key (naming the closest known key, or the valid ones), a value of the wrong type, a
        value outside its range (`checked`), two fields out of order (`ordered`) or a required field left unset.
    Source: the DINOv2 / nanoGPT way (STYLE.md): defaults in code, small override files, typos rejected.
    """
    config = OmegaConf.structured(schema)
    if path is not None:
        _merge(config, _read_chain(find_config(path), seen=()), f"config file {path}")
    for item in overrides:
        key, sep, value = item.partition("=")
        shown = repr(item if len(item) <= 80 else item[:77] + "...")
        if not sep or not key.strip():
            raise ConfigError(f"bad override {shown}: expected key=value, e.g. train.batch_size=64")
        if key.count(".") >= MAX_YAML_DEPTH:
            raise ConfigError(f"bad override {shown}: its key is nested more than {MAX_YAML_DEPTH} levels deep")
        if has_control_character(item):
            # YAML folds a newline inside quotes into a space: 'a<newline>b' would silently become "a b"
            raise ConfigError(f"bad override {shown}: it holds a control character (a newline, tab, ...)")
        check_yaml(value, f"override {shown}")
        try:
            parsed = OmegaConf.from_dotlist([item])
            parsed = OmegaConf.create(_literal(OmegaConf.to_container(parsed, resolve=False)))
        except (OmegaConfBaseException, yaml.YAMLError, ValueError) as error:  # a !!python/... tag; a 5000-digit int
            raise ConfigError(f"bad override {shown}: {' '.join(str(error).split())}") from None
        _merge(config, parsed, f"override {shown}")
    try:
        resolved = OmegaConf.to_object(config)
    except OmegaConfBaseException as error:
        raise ConfigError(f"incomplete config: {_first_line(error)}") from None
    validate(resolved)
    return resolved


def data_root(root: str | Path | None, holds: str) -> Path:
    """`root` (a config's data.root) as a Path. Raises ConfigError "data.root is not set: give data.root=DIR, the
    folder that holds HOLDS" when it is None or empty: the one message of every command that reads a dataset."""
    if not root:
        raise ConfigError(f"data.root is not set: give data.root=DIR, the folder that holds {holds}")
    return Path(root)


def save_config(config, output_dir: str | Path) -> Path:
    """Write the resolved config to OUTPUT_DIR/config.yaml, headed by the git commit it ran from. Raises
    FileWriteError naming the folder or file when the disk refuses."""
    output_dir = make_dir(output_dir, "output_dir")
    path = output_dir / "config.yaml"
    text = f"# rs-transfer run config; git commit: {git_commit()}\n" + OmegaConf.to_yaml(OmegaConf.structured(config))
    return atomic_write_text(path, text)


def to_dict(config) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(config))


def git_commit() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return commit + (" (with uncommitted changes)" if dirty else "")


def _read_chain(path: Path, seen: tuple) -> DictConfig:
    if path.resolve() in seen:
        raise ConfigError(f"config file {path} includes itself through `base:`")
    try:
        text = path.read_text(encoding=TEXT_ENCODING)
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read config file {path}: {error}") from None
    data = read_yaml(text, f"config file {path}") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, not a {type(data).__name__}")
    base = data.pop("base", None)
    try:
        layer = OmegaConf.create(_literal(data))
    except OmegaConfBaseException as error:  # e.g. a key that is not a string ({null: 1})
        raise ConfigError(f"config file {path}: {_first_line(error)}") from None
    if base is None:
        return layer
    if not isinstance(base, str):
        raise ConfigError(f"config file {path}: `base:` must name one file, not {base!r}")
    try:
        base_path = find_config(base, relative_to=path.parent)  # beside this file first, then a packaged name
    except ConfigError as error:
        raise ConfigError(f"{error} (the `base:` of {path})") from None
    parent = _read_chain(base_path, seen + (path.resolve(),))
    return OmegaConf.merge(parent, layer)


def _merge(config: DictConfig, layer: DictConfig, source: str) -> None:
    try:
        config.merge_with(layer)
    except ConfigKeyError as error:
        raise ConfigError(f"{source}: {_unknown_key_message(config, error)}") from None
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None)
        where = f"key {key!r}: " if key else ""
        raise ConfigError(f"{source}: {where}{_first_line(error)}") from None


def _unknown_key_message(config: DictConfig, error: ConfigKeyError) -> str:
    full_key = str(getattr(error, "full_key", "") or getattr(error, "key", ""))
    parent_path, _, key = full_key.rpartition(".")
    parent = OmegaConf.select(config, parent_path) if parent_path else config
    valid = [str(k) for k in parent.keys()] if isinstance(parent, DictConfig) else []
    message = f"unknown key {full_key!r}"
    close = difflib.get_close_matches(key, valid, n=1)
    if close:
        return f"{message}; did you mean {(parent_path + '.' if parent_path else '') + close[0]!r}?"
    return f"{message}; valid keys here: {', '.join(valid)}"


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
