"""What the `pretrain` command does, called by pretrain/commands.py (and by `reproduce table1`, reproduce/table1.py).
The engine writes the run's files, weights.pth (the network, EMA weights when trained with EMA) included."""

import logging
from pathlib import Path

from rs_transfer.config import load_config
from rs_transfer.engine.distributed import init_distributed, seed_everything
from rs_transfer.engine.write_once import write_once
from rs_transfer.pretrain.config import PretrainConfig

log = logging.getLogger(__name__)


def pretrain(config_path: str, overrides: list, synthetic: bool = False) -> dict:
    from rs_transfer import families
    from rs_transfer.engine.trainer import train
    from rs_transfer.pretrain.task import TASK, skipped_reads

    config = load_config(PretrainConfig, config_path, overrides)
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


SYNTHETIC_CLASSES = 4  # when model.num_classes is unset


def make_synthetic(config: PretrainConfig) -> Path:
    """The demo's generated folder dataset in OUTPUT_DIR/synthetic_data (written once, atomically)."""
    from rs_transfer.pretrain.synthetic import make_folder_dataset

    classes = config.model.num_classes or SYNTHETIC_CLASSES
    return write_once(Path(config.output_dir) / "synthetic_data",
                      lambda folder: make_folder_dataset(folder, num_classes=classes, train_per_class=64,
                                                         val_per_class=16))
