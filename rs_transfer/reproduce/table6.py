"""Table 6: the 3D ResNet-RS ladder on Kinetics-400, 30-view top-1 (PAPER.md section 6). One config per row in
rs_transfer/configs/video/table6/, each naming the previous row as its base."""

from pathlib import Path

from rs_transfer.reproduce.common import Ladder, Row
from rs_transfer.video.config import VideoConfig
from rs_transfer.video.run import run_train

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

LADDER = Ladder(name="table6", title="Table 6: 3D ResNet-RS on Kinetics-400 (top-1 %, 30 views)", rows=TABLE6,
                configs="video/table6", metric="top1", unit="top-1 %", default_out="runs/video", schema=VideoConfig,
                train=run_train)


def config_path(row: Row) -> Path:
    return LADDER.config(row)
