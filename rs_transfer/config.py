"""Typed run configs: dataclass defaults, then a YAML file (which may name one `base:` file), then `key=value`.

Every command has a schema: a dataclass built from the sections below (a task adds its own sections by
subclassing `RunConfig`). Unknown keys and values of the wrong type are errors that name the key and suggest
the closest valid one. The resolved config is saved with every run as `OUTPUT_DIR/config.yaml`, with the git
commit it ran from, and loads back as it is.
"""

import difflib
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from rs_transfer.errors import UserError
from rs_transfer.files import atomic_write_text

T = TypeVar("T")


class ConfigError(UserError):
    pass


@dataclass
class ModelConfig:
    name: str = "rs50"
    num_classes: int = 1000
    weights: Optional[str] = None  # checkpoint file to start from (timm's or ours), read offline
    drop_rate: float = 0.0  # dropout before the classifier
    drop_path_rate: float = 0.0  # stochastic depth
    drop_path_schedule: str = "stage"  # "stage" (official) or "block" (timm)
    zero_init_last: bool = True
    bn_momentum: float = 0.1  # PyTorch convention; the RS recipe uses 1.0 with an EMA of BN buffers
    init: str = "official"  # or "timm"


@dataclass
class DataConfig:
    root: Optional[str] = None
    num_workers: int = 4


@dataclass
class TrainConfig:
    # Length: give exactly one. A step is one optimizer update of `batch_size` images.
    epochs: Optional[int] = None
    steps: Optional[int] = None
    batch_size: int = 256  # global: per-process batch x processes x grad_accum_steps
    grad_accum_steps: int = 1
    # Optimizer: SGD with momentum; peak LR = lr x batch_size / 256 when scale_lr, else lr.
    lr: float = 0.1
    scale_lr: bool = True
    momentum: float = 0.9
    nesterov: bool = True  # official TF1 ResNet-RS code
    weight_decay: float = 4e-5
    weight_decay_norm_bias: bool = False  # False: no decay on 1-D parameters (BN/LN/GN scales and shifts, biases)
    clip_grad_norm: Optional[float] = None  # max global gradient norm; None: no clipping
    # Schedule over optimizer steps: linear warmup to the peak LR, then "cosine" to 0 or "step" decay.
    schedule: str = "cosine"
    warmup_epochs: float = 0.0  # give warmup_epochs or warmup_steps, not both
    warmup_steps: int = 0
    decay_epochs: list[float] = field(default_factory=list)  # "step": multiply LR by decay_rate at these epochs
    decay_steps: list[int] = field(default_factory=list)  # ... or at these steps
    decay_rate: float = 0.1
    label_smoothing: float = 0.0  # read by tasks that use a cross-entropy loss
    # EMA of weights and BN buffers, updated after every step; evaluation uses it when on.
    ema_decay: Optional[float] = None  # e.g. 0.9999; None: no EMA
    ema_warmup: bool = True  # official: decay at step t = min(ema_decay, (1 + t) / (10 + t))
    # Speed: autocast, channels-last memory format, torch.compile.
    amp: str = "auto"  # "bf16", "none", or "auto": bf16 on GPU, none on CPU (CPU bf16 is often several times slower)
    channels_last: bool = True
    compile: bool = False
    sync_bn: bool = False  # SyncBatchNorm across processes (dense tasks with small per-GPU batches)
    find_unused_parameters: bool = False  # DDP option for models that skip parameters in some steps
    device: str = "auto"  # "auto" (cuda:LOCAL_RANK when CUDA is available, else cpu), "cpu" or "cuda"
    # Evaluation, checkpoints and logging. Evaluation always runs at the end as well.
    eval_every_epochs: int = 1  # 0: off
    eval_every_steps: int = 0  # 0: off
    checkpoint_every_steps: int = 0  # also checkpoint after every evaluation and at the end; 0: only those
    keep_last: int = 2  # step checkpoints kept, besides best.pt; 0: all
    log_every_steps: int = 50
    resume: Optional[str] = None  # "auto" (newest checkpoint in OUTPUT_DIR/checkpoints, if any) or a file


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output_dir: str = "runs/default"
    seed: int = 0


def load_config(schema: type[T], path: str | Path | None = None, overrides: list | tuple = ()) -> T:
    """Defaults of `schema`, then the YAML at `path` (and its `base:` chain), then `key=value` overrides."""
    config = OmegaConf.structured(schema)
    if path is not None:
        _merge(config, _read_chain(Path(path), seen=()), f"config file {path}")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"bad override {item!r}: expected key=value, e.g. train.batch_size=64")
        try:
            parsed = OmegaConf.from_dotlist([item])
        except OmegaConfBaseException as error:
            raise ConfigError(f"bad override {item!r}: {error}") from None
        _merge(config, parsed, f"override {item!r}")
    try:
        return OmegaConf.to_object(config)
    except OmegaConfBaseException as error:
        raise ConfigError(f"incomplete config: {_first_line(error)}") from None


def save_config(config, output_dir: str | Path) -> Path:
    """Write the resolved config to OUTPUT_DIR/config.yaml, headed by the git commit it ran from."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
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
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"config file {path} includes itself through `base:`")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML: {' '.join(str(error).split())}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, not a {type(data).__name__}")
    base = data.pop("base", None)
    layer = OmegaConf.create(data)
    if base is None:
        return layer
    parent = _read_chain((path.parent / base), seen + (path.resolve(),))
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
