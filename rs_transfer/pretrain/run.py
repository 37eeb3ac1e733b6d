"""What the `pretrain` command does, called by pretrain/commands.py (and by `reproduce table1`, reproduce/table1.py).
The engine writes the run's files, weights.pth (the network, EMA weights when trained with EMA) included."""

import logging
from pathlib import Path

from rs_transfer.config import load_config
from rs_transfer.pretrain.config import PretrainConfig, check_cotrain

log = logging.getLogger(__name__)


def pretrain(config_path: str, overrides: list, synthetic: bool = False) -> dict:
    """Train the config at `config_path` with `overrides`; returns the final metrics. The config, the model name and
    the weights files are checked before torch is imported (~5-30 s), so a typo is answered at once."""
    config = load_config(PretrainConfig, config_path, overrides)
    check_start(config, synthetic)
    from rs_transfer import families
    from rs_transfer.engine.distributed import init_distributed, seed_everything
    from rs_transfer.engine.trainer import train
    from rs_transfer.pretrain.task import TASK, skipped_reads

    init_distributed(config.train.device)  # before building data, so ranks can agree on it
    if synthetic:
        config.data.root = str(make_synthetic(config))
    seed_everything(config.seed)  # before the model and anything else random is built: same seed, same run
    task = families.build(TASK, config)
    metrics = train(config, task)
    skipped = skipped_reads(task)
    if skipped:
        log.warning("%d reads of unreadable training images were skipped (each is named above)", skipped)
    log.info("final metrics: %s", " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    return metrics


def check_start(config: PretrainConfig, synthetic: bool) -> None:
    """Torch-free checks of what the run starts from: co-training's pseudo-labels and the model name (UserError),
    model.weights (WeightsError), and that data.root is set (ConfigError) and holds a training split (DataError, as
    data.load_split says it)."""
    from rs_transfer.config import data_root
    from rs_transfer.errors import DataError
    from rs_transfer.models import check_weights, family_of

    check_cotrain(config)
    family_of(config.model.name)
    check_weights(config.model.weights)
    if synthetic:
        return
    root = data_root(config.data.root, "train/<class>/<images> and val/<class>/<images>")  # as task.py says
    if not (root / "train").is_dir():
        raise DataError(f"data split not found: {root / 'train'} (expected {root}/train/<class>/<images> or "
                        f"{root}/train/*.tar)")


SYNTHETIC_CLASSES = 4  # when model.num_classes is unset


def make_synthetic(config: PretrainConfig) -> Path:
    """The demo's generated folder dataset in OUTPUT_DIR/synthetic_data (written once, atomically)."""
    from rs_transfer.engine.write_once import write_once
    from rs_transfer.pretrain.synthetic import make_folder_dataset

    classes = config.model.num_classes or SYNTHETIC_CLASSES
    return write_once(Path(config.output_dir) / "synthetic_data",
                      lambda folder: make_folder_dataset(folder, num_classes=classes, train_per_class=64,
                                                         val_per_class=16))
