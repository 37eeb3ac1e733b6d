"""Every paper table, one module each: its rows or grid (with the paper's numbers), its runner and its renderer.

- table1.py, table2.py, table4.py: the pretraining tables (ImageNet top-1): Table 1's additive ladder on
  ResNet-200, Table 2's weight decay pairs, Table 4's co-training run; `reproduce tableN` collects finished runs
  (`--run` trains the missing ones, `--repeats N` runs each row N times, `--dry-run` lists the runs)
- table5.py: transfer (`reproduce table5`): sweeps each checkpoint on each task, writes table5.md / table5.json
- table6.py: the video ladder (`reproduce table6`), the same runner as Tables 1, 2 and 4
- table7.py: speed at equal accuracy (`bench table7`): measures each row with bench/latency.py, writes table7.md,
  table7.json and pareto.png
- common.py: what they share: `write_table`, the one writer of TABLE.json / TABLE.md (atomic, main rank only),
  and the ladder tables (`Ladder`: rows of a packaged config plus the paper's number, collected from each run's
  `final_metrics.json`, rendered paper vs ours)

A ladder table is a module with a `LADDER`, registered below by name; Table 5 takes its own arguments (commands.py).
"""

import importlib

from rs_transfer.errors import UserError

LADDERS = {
    "table1": "rs_transfer.reproduce.table1",
    "table2": "rs_transfer.reproduce.table2",
    "table4": "rs_transfer.reproduce.table4",
    "table6": "rs_transfer.reproduce.table6",
}


def run_ladder(name: str, out: str | None, run: bool, overrides: list, repeats: int = 1, dry_run: bool = False) -> list:
    """`reproduce NAME` for a ladder table (see common.reproduce_ladder). Raises UserError for an unknown name."""
    if name == "table7":  # its rows are measurements, so its command is a benchmark; the table is table7.py's
        raise UserError("Table 7 is measured, not trained: run `rs-transfer bench table7` (rs_transfer/reproduce/"
                        "table7.py renders it)")
    if name not in LADDERS:
        raise UserError(f"unknown table {name!r}: expected one of {', '.join(sorted([*LADDERS, 'table5']))}, "
                        "or `rs-transfer bench table7`")
    from rs_transfer.reproduce.common import reproduce_ladder

    ladder = importlib.import_module(LADDERS[name]).LADDER
    return reproduce_ladder(ladder, out, run, overrides, repeats, dry_run)
