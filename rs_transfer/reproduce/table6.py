"""Table 6: the 3D ResNet-RS ladder on Kinetics-400, 30-view top-1 (PAPER.md section 6). One config per row in
rs_transfer/configs/video/table6/, each naming the previous row as its base."""

import logging
from pathlib import Path

from rs_transfer.config import packaged_configs
from rs_transfer.engine.distributed import is_main
from rs_transfer.reproduce.common import Row, collect, ladder_markdown, write_table

log = logging.getLogger(__name__)

TABLE6 = (
    Row("01_baseline", "Baseline (200 epochs, cosine)", 73.4),
    Row("02_fc_dropout", "+ FC dropout", 74.4),
    Row("03_label_smoothing", "+ label smoothing", 74.9),
    Row("04_stochastic_depth", "+ stochastic depth", 76.1),
    Row("05_ema", "+ EMA", 76.1),
    Row("06_weight_decay", "+ weight decay 4e-5", 76.3),
    Row("07_350_epochs", "+ 350 epochs", 76.4),
    Row("08_scale_jitter", "+ scale jittering", 77.4),
    Row("09_se", "+ SE", 77.9),
    Row("10_resnet_d", "+ ResNet-D", 78.2),
)


def config_path(row: Row) -> Path:
    return packaged_configs() / "video" / "table6" / f"{row.key}.yaml"


def reproduce(out: str, run: bool, overrides: list) -> list:
    from rs_transfer.video.run import run_train

    def train(row, run_dir):
        run_train(str(config_path(row)), [*overrides, f"output_dir={run_dir}"])

    results = collect(TABLE6, Path(out) / "table6", "top1", train if run else None)
    markdown = ladder_markdown("Table 6: 3D ResNet-RS on Kinetics-400 (top-1 %, 30 views)", results, "top-1 %",
                               scale=100.0)
    json_path, md_path = write_table(out, "table6", markdown, results)
    if is_main():
        log.info("wrote %s and %s", md_path, json_path)
    return results
