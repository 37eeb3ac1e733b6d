"""Table 1 (rs_transfer/reproduce/table1.py): `reproduce table1 --dry-run` lists the ladder's runs."""

from rs_transfer.cli import main
from rs_transfer.reproduce.table1 import TABLE1


def test_reproduce_table1_dry_run_lists_the_runs(capsys):
    assert main(["reproduce", "table1", "--dry-run"]) == 0
    out = capsys.readouterr().out
    for name, change, top1 in TABLE1:
        assert name in out and f"{top1:.1f}" in out
    assert "11 runs" in out
