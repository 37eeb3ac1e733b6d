"""Table 1: the additive study on ResNet-200 @ 256, ImageNet top-1 (PAPER.md section 3). One config per row in
rs_transfer/configs/pretrain/table1/, each adding one change to the previous row (its `base:`)."""

from rs_transfer.pretrain.config import PretrainConfig
from rs_transfer.pretrain.run import pretrain
from rs_transfer.reproduce.common import Ladder, Row

TABLE1 = (
    Row("00_baseline", "baseline: 90 epochs, step decay", 79.0),
    Row("01_cosine", "+ cosine LR schedule", 79.3),
    Row("02_350_epochs", "+ 350 epochs", 78.8),
    Row("03_ema", "+ EMA of weights", 79.1),
    Row("04_label_smoothing", "+ label smoothing", 80.4),
    Row("05_stochastic_depth", "+ stochastic depth", 80.6),
    Row("06_randaugment", "+ RandAugment", 81.0),
    Row("07_dropout", "+ dropout on FC", 80.7),
    Row("08_weight_decay", "+ weight decay 1e-4 -> 4e-5", 82.2),
    Row("09_se", "+ squeeze-and-excitation", 82.9),
    Row("10_resnet_d", "+ ResNet-D", 83.4),
)

LADDER = Ladder(name="table1", title="Table 1: ResNet-200 @ 256, one training or architecture change per row "
                "(ImageNet top-1 %)", rows=TABLE1, configs="pretrain/table1", metric="top1", unit="top-1 %",
                default_out="runs", schema=PretrainConfig, train=pretrain)
