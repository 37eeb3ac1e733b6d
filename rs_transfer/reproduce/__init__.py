"""`rs-transfer reproduce TABLE`: run (or collect) a paper table's grid of runs and write TABLE.md / TABLE.json.

A table is a module with `reproduce(out, run, overrides)`, registered below by name; `common` has the parts
they share (rows with the paper's numbers, collecting `final_metrics.json`, writing the table). Adding a table
is one module and one line here.
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
