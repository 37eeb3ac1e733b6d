"""Table 4: RS-152 @ 224 co-trained on labelled ImageNet and pseudo-labelled images, ImageNet top-1 (PAPER.md
section 4; the paper's reference is EfficientNet-B5 Noisy Student, 86.1). Its config is
rs_transfer/configs/pretrain/rs152_i224_cotrain.yaml: make the pseudo-labels first and give
`cotrain.pseudo_labels=DIR` (docs/pretrain.md)."""

from rs_transfer.pretrain.config import PretrainConfig
from rs_transfer.pretrain.run import pretrain
from rs_transfer.reproduce.common import Ladder, Row

TABLE4 = (
    Row("rs152_i224_cotrain", "RS-152 @ 224, co-training with pseudo-labels", 86.2),
)

LADDER = Ladder(name="table4", title="Table 4: semi-supervised co-training (ImageNet top-1 %)", rows=TABLE4,
                configs="pretrain", metric="top1", unit="top-1 %", default_out="runs", schema=PretrainConfig,
                train=pretrain)
