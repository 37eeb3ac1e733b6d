"""Table 1: the additive study on ResNet-200 @ 256, ImageNet top-1 (PAPER.md section 3). One config per row in
rs_transfer/configs/pretrain/table1/, each adding one change to the previous row. A runner only: `--dry-run` lists
the runs, otherwise they train one after another; no table file is rendered yet."""

import logging

from rs_transfer.config import load_config, packaged_configs
from rs_transfer.pretrain.config import PretrainConfig
from rs_transfer.pretrain.run import pretrain

log = logging.getLogger(__name__)

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


def run_table1(dry_run: bool, overrides: list) -> list:
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
