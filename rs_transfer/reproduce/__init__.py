"""Every paper table, one module each: its runner (list, run or collect the runs) and its renderer.

- table1.py: the Table 1 ladder on ResNet-200 @ 256 (`reproduce table1`): lists or trains its eleven runs
- table5.py: transfer (`reproduce table5`): sweeps each checkpoint on each task, writes table5.md / table5.json
- table6.py: the video ladder (`reproduce table6`): collects (or trains) its rows, writes table6.md / table6.json
- table7.py: speed at equal accuracy (`bench table7`): measures each row with bench/latency.py, writes table7.md,
  table7.json and pareto.png
- common.py: what they share: `write_table`, the one writer of TABLE.json / TABLE.md (atomic, main rank only),
  and the ladder rows (a config plus the paper's number, collected from `final_metrics.json`)

Tables 2 and 4 are configs only (rs_transfer/configs/pretrain/table2/, rs152_i224_cotrain.yaml), run with
`rs-transfer pretrain`. A ladder table is a module with `reproduce(out, run, overrides)`, registered below by
name; Tables 1 and 5 take their own arguments (cli.py).
"""

import importlib

from rs_transfer.errors import UserError

TABLES = {
    "table6": "rs_transfer.reproduce.table6",
}


def run_table(name: str, out: str, run: bool, overrides: list) -> list:
    if name not in TABLES:
        raise UserError(f"unknown table {name!r}: expected one of {', '.join(sorted(TABLES))}")
    return importlib.import_module(TABLES[name]).reproduce(out, run, overrides)
