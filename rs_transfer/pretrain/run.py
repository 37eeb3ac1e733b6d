"""What the `pretrain`, `pseudo-label` and `reproduce table1` commands do, called by cli.py."""

import logging
from pathlib import Path

from rs_transfer.config import load_config, packaged_configs
from rs_transfer.engine.checkpoint import atomic_save
from rs_transfer.engine.distributed import init_distributed, is_main, seed_everything
from rs_transfer.engine.write_once import write_once
from rs_transfer.models.weights import read_state_dict
from rs_transfer.pretrain.config import PretrainConfig

log = logging.getLogger(__name__)

# Table 1 of the paper: ResNet-200 @ 256, each row adds one change to the previous (PAPER.md section 3).
TABLE1 = (
    ("00_baseline.yaml", "baseline: 90 epochs, step decay", 79.0),
    ("01_cosine.yaml", "+ cosine LR schedule", 79.3),
    ("02_350_epochs.yaml", "+ 350 epochs", 78.8),
    ("03_ema.yaml", "+ EMA of weights", 79.1),
    ("04_label_smoothing.yaml", "+ label smoothing", 80.4),
    ("05_stochastic_depth.yaml", "+ stochastic depth", 80.6),
    ("06_randaugment.yaml", "+ RandAugment", 81.0),
    ("07_dropout.yaml", "+ dropout on FC", 80.7),
    ("08_weight_decay.yaml", "+ weight decay 1e-4 -> 4e-5", 82.2),
    ("09_se.yaml", "+ squeeze-and-excitation", 82.9),
    ("10_resnet_d.yaml", "+ ResNet-D", 83.4),
)


def pretrain(config_path: str, overrides: list, synthetic: bool = False) -> dict:
    from rs_transfer.engine.trainer import train
    from rs_transfer.pretrain.task import build_task

    config = load_config(PretrainConfig, config_path, overrides)
    init_distributed(config.train.device)  # before building data, so ranks can agree on it
    if synthetic:
        config.data.root = str(make_synthetic(config))
    seed_everything(config.seed)  # before the model and anything else random is built: same seed, same run
    task = build_task(config)
    metrics = train(config, task)
    train_sets = [task.collate_fn.labelled, task.collate_fn.pseudo] if config.cotrain.enabled else [task.train_set]
    skipped = sum(train_set.skipped for train_set in train_sets)
    if skipped:
        log.warning("%d reads of unreadable training images were skipped (each is named above)", skipped)
    if is_main():
        export_weights(Path(config.output_dir) / "final.pt", Path(config.output_dir) / "weights.pth")
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


def export_weights(checkpoint: Path, out: Path) -> Path:
    """The network's weights alone (EMA when trained with it), loadable by `create_model(..., weights=out)`."""
    atomic_save(read_state_dict(checkpoint, prefer_ema=True), out)
    log.info("weights for fine-tuning: %s", out)
    return out


def table1(dry_run: bool, overrides: list) -> list:
    runs = []
    for name, change, top1 in TABLE1:
        path = packaged_configs() / "pretrain" / "table1" / name
        config = load_config(PretrainConfig, path, overrides)
        runs.append((path, change, top1, config))
    if dry_run:
        print(f"{'config':<52}{'change':<32}{'paper top-1':>12}  output_dir")
        for path, change, top1, config in runs:
            print(f"{path.relative_to(packaged_configs()).as_posix():<52}{change:<32}{top1:>12.1f}  {config.output_dir}")
        print(f"\n{len(runs)} runs of ResNet-200 @ 256; run them with `rs-transfer reproduce table1 data.root=DIR`")
        return runs
    for path, change, top1, _ in runs:
        log.info("Table 1 row %s (%s; paper top-1 %.1f)", path.name, change, top1)
        pretrain(str(path), overrides)
    return runs
