"""The pretraining tables (rs_transfer/reproduce/table1.py, table2.py, table4.py) and the ladder runner they share
with Table 6 (reproduce/common.py): listing, collecting, repeats, and their numbers against PAPER.md."""

import dataclasses
import json
import re
from pathlib import Path

import pytest
import yaml

from rs_transfer.cli import main
from rs_transfer.config import ConfigError
from rs_transfer.errors import UserError
from rs_transfer.reproduce import LADDERS, run_ladder
from rs_transfer.reproduce.table1 import TABLE1
from rs_transfer.reproduce.table2 import TABLE2
from rs_transfer.reproduce.table4 import TABLE4

def test_reproduce_table1_dry_run_lists_the_runs(capsys):
    assert main(["reproduce", "table1", "--dry-run"]) == 0
    out = capsys.readouterr().out
    for row in TABLE1:
        assert row.key in out and f"{row.paper:.1f}" in out
    assert "11 runs" in out


def test_every_ladder_row_has_its_packaged_config():
    import importlib

    for name, module in LADDERS.items():
        ladder = importlib.import_module(module).LADDER
        assert ladder.name == name
        for row in ladder.rows:
            assert ladder.config(row).is_file(), (name, row.key)


# PAPER.md section 3, verbatim (weight decay 1e-4 / 4e-5), and section 4's Table 4 sentence.
PAPER_TABLE2 = ("Table 2 (weight decay 1e-4 vs 4e-5): RS-50 none 79.7/78.7; RA-LS 82.4/82.3; RA-LS-DO 82.2/82.7; "
                "RS-200 none 82.5/81.7; RA-LS 85.2/84.9; RA-LS-SD-DO 85.3/85.5.")
PAPER_TABLE4 = "RS-152 @224 reaches 86.2%"


def test_table2_and_table4_numbers_are_the_papers():
    numbers = [float(x) for pair in re.findall(r"(\d+\.\d)/(\d+\.\d)", PAPER_TABLE2) for x in pair]
    assert [row.paper for row in TABLE2] == numbers
    assert [row.key.endswith("wd1e-4") for row in TABLE2] == [True, False] * 6
    assert [row.key.split("_wd")[0] for row in TABLE2] == [
        name for name in ("rs50_none", "rs50_ra_ls", "rs50_ra_ls_do", "rs200_none", "rs200_ra_ls", "rs200_ra_ls_sd_do")
        for _ in range(2)]
    assert [f"{row.paper}%" for row in TABLE4] == [PAPER_TABLE4.split()[-1]]


def _finish(folder: Path, top1: float) -> None:
    folder.mkdir(parents=True)
    (folder / "final_metrics.json").write_text(json.dumps({"top1": top1, "top5": 0.95}))


def test_reproduce_table2_collects_finished_rows_and_renders_paper_vs_ours(tmp_path):
    _finish(tmp_path / "table2" / "rs50_none_wd1e-4", 0.791)
    assert main(["reproduce", "table2", "--out", str(tmp_path)]) == 0  # collects only: no --run
    results = {r["row"]: r for r in json.loads((tmp_path / "table2.json").read_text())}
    assert results["rs50_none_wd1e-4"]["ours"] == pytest.approx(0.791) and results["rs50_none_wd1e-4"]["status"] == "done"
    assert results["rs200_ra_ls_sd_do_wd4e-5"]["status"] == "not run"
    table = (tmp_path / "table2.md").read_text()
    assert "| RS-50, none, wd 1e-4 | 79.7 | 79.1 | -0.6 |" in table


def test_repeats_report_mean_and_spread_and_train_missing_repeats_with_their_own_seed(tmp_path, monkeypatch):
    from rs_transfer.reproduce import table4

    trained = []

    def fake_pretrain(config_file, overrides):
        options = {key: str(yaml.safe_load(value)) for key, value in (item.split("=", 1) for item in overrides)}
        trained.append((Path(config_file).name, options["seed"], options["output_dir"]))
        _finish(Path(options["output_dir"]), 0.86 + 0.004 * int(options["seed"]))

    monkeypatch.setattr(table4, "LADDER", dataclasses.replace(table4.LADDER, train=fake_pretrain))
    tmp_path = tmp_path / "a:{b}"  # a folder name YAML would read as a mapping: overrides must quote it
    _finish(tmp_path / "table4" / "rs152_i224_cotrain", 0.862)  # repeat 0 is done already
    results = run_ladder("table4", str(tmp_path), True, ["seed=3"], repeats=2)
    assert trained == [("rs152_i224_cotrain.yaml", "4", str(tmp_path / "table4" / "rs152_i224_cotrain-repeat1"))]
    (row,) = results
    assert row["values"] == pytest.approx([0.862, 0.876]) and row["ours"] == pytest.approx(0.869)
    assert row["spread"] == pytest.approx(0.014) and row["status"] == "done"
    assert "86.9 ± 0.7 (2 runs)" in (tmp_path / "table4.md").read_text()


def test_ladder_checks_every_override_and_repeats_before_training(tmp_path):
    with pytest.raises(ConfigError, match="train.batch_sise"):
        run_ladder("table1", str(tmp_path), True, ["train.batch_sise=8"])
    with pytest.raises(UserError, match="--repeats must be >= 1"):
        run_ladder("table2", str(tmp_path), False, [], repeats=0)
    with pytest.raises(UserError, match="unknown table 'table3'"):
        run_ladder("table3", str(tmp_path), False, [])
    with pytest.raises(UserError, match="rs-transfer bench table7"):
        run_ladder("table7", str(tmp_path), False, [])
    assert not any(tmp_path.iterdir())


def test_every_ladder_row_trains_where_reproduce_collects_it():
    # `pretrain --config ROW.yaml` (one job per row on a cluster) and `reproduce tableN` must meet in one folder
    import importlib

    from rs_transfer.config import load_config

    for name, module in LADDERS.items():
        ladder = importlib.import_module(module).LADDER
        for row in ladder.rows:
            config = load_config(ladder.schema, ladder.config(row))
            assert config.output_dir == f"{ladder.default_out}/{name}/{row.key}", (name, row.key)
