"""Table 2: weight decay 1e-4 vs 4e-5 as regularisers stack up, RS-50 and RS-200, ImageNet top-1 (PAPER.md section
3). One config per row in rs_transfer/configs/pretrain/table2/; each 4e-5 config is its 1e-4 twin with only the
weight decay changed. RA = RandAugment, LS = label smoothing, SD = stochastic depth, DO = FC dropout."""

from rs_transfer.pretrain.config import PretrainConfig
from rs_transfer.pretrain.run import pretrain
from rs_transfer.reproduce.common import Ladder, Row

TABLE2 = (
    Row("rs50_none_wd1e-4", "RS-50, none, wd 1e-4", 79.7),
    Row("rs50_none_wd4e-5", "RS-50, none, wd 4e-5", 78.7),
    Row("rs50_ra_ls_wd1e-4", "RS-50, RA-LS, wd 1e-4", 82.4),
    Row("rs50_ra_ls_wd4e-5", "RS-50, RA-LS, wd 4e-5", 82.3),
    Row("rs50_ra_ls_do_wd1e-4", "RS-50, RA-LS-DO, wd 1e-4", 82.2),
    Row("rs50_ra_ls_do_wd4e-5", "RS-50, RA-LS-DO, wd 4e-5", 82.7),
    Row("rs200_none_wd1e-4", "RS-200, none, wd 1e-4", 82.5),
    Row("rs200_none_wd4e-5", "RS-200, none, wd 4e-5", 81.7),
    Row("rs200_ra_ls_wd1e-4", "RS-200, RA-LS, wd 1e-4", 85.2),
    Row("rs200_ra_ls_wd4e-5", "RS-200, RA-LS, wd 4e-5", 84.9),
    Row("rs200_ra_ls_sd_do_wd1e-4", "RS-200, RA-LS-SD-DO, wd 1e-4", 85.3),
    Row("rs200_ra_ls_sd_do_wd4e-5", "RS-200, RA-LS-SD-DO, wd 4e-5", 85.5),
)

LADDER = Ladder(name="table2", title="Table 2: weight decay as regularisers are added (ImageNet top-1 %)",
                rows=TABLE2, configs="pretrain/table2", metric="top1", unit="top-1 %", default_out="runs",
                schema=PretrainConfig, train=pretrain)
