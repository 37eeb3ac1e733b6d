"""Result files a run left behind (final_metrics.json, sweep.json) as commands read them back: corrupt, of another
task, or hand-edited. Every reader is engine/summary.py's `read_final_metrics`; a bad file is one `error:` line
naming it, never a traceback, and `rs-transfer runs` lists it with the problem instead of failing."""

import json

import pytest
import yaml

from rs_transfer.cli import main
from rs_transfer.downstream import finetune
from rs_transfer.engine.summary import read_final_metrics
from rs_transfer.errors import DataError

BAD_FILES = {
    "not JSON": ("{bad", "is not readable JSON"),
    "a list": ("[0.5]", "holds a JSON list, not an object"),
    "a word": ('{"top1": "high", "top5": 0.9}', "top1 = 'high' is not a number"),
    "another task's": ('{"miou": 0.5}', "has no 'top1' \\(it holds 'miou'\\)"),
}


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    return err


@pytest.mark.parametrize("text, message", BAD_FILES.values(), ids=BAD_FILES)
def test_the_reader_names_the_file_and_what_is_wrong(tmp_path, text, message):
    (tmp_path / "final_metrics.json").write_text(text)
    with pytest.raises(DataError, match=f"^{tmp_path / 'final_metrics.json'}.*{message}"):
        read_final_metrics(tmp_path, "top1")


def test_the_reader_returns_none_without_a_file_and_the_dict_with_one(tmp_path):
    assert read_final_metrics(tmp_path, "top1") is None
    (tmp_path / "final_metrics.json").write_text('{"top1": 0.8, "top5": 0.95}')
    assert read_final_metrics(tmp_path, "top1") == {"top1": 0.8, "top5": 0.95}


@pytest.mark.parametrize("text, message", BAD_FILES.values(), ids=BAD_FILES)
def test_table5_result_folder_with_a_bad_final_metrics_is_one_error_line(tmp_path, capsys, text, message):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "final_metrics.json").write_text(text)
    assert main(["reproduce", "table5", "--result", f"X:cifar100={tmp_path / 'run'}", "--out", str(tmp_path)]) == 2
    assert "final_metrics.json" in _one_error_line(capsys)
    assert not (tmp_path / "table5.md").exists()


def test_table5_result_folder_with_a_corrupt_sweep_json_is_one_error_line(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "sweep.json").write_text('{"best": ')
    assert main(["reproduce", "table5", "--result", f"X:cifar100={tmp_path / 'run'}", "--out", str(tmp_path)]) == 2
    assert f"{tmp_path / 'run' / 'sweep.json'} is not readable JSON" in _one_error_line(capsys)


def test_a_ladder_table_with_a_corrupt_row_is_one_error_line_naming_the_row(tmp_path, capsys):
    row = tmp_path / "table2" / "rs50_none_wd1e-4"
    row.mkdir(parents=True)
    (row / "final_metrics.json").write_text("{bad")
    assert main(["reproduce", "table2", "--out", str(tmp_path)]) == 2
    assert f"{row / 'final_metrics.json'} is not readable JSON" in _one_error_line(capsys)


def test_collecting_a_sweep_whose_point_lacks_the_metric_names_the_file(tmp_path):
    for point, values in (("lr0.1_steps10", {"top1": 0.5}), ("lr0.2_steps10", {"miou": 0.5})):
        (tmp_path / point).mkdir()
        (tmp_path / point / "final_metrics.json").write_text(json.dumps(values))
    with pytest.raises(DataError, match=r"lr0.2_steps10/final_metrics.json has no 'top1'"):
        finetune.collect_sweep(tmp_path, "cifar100")


def test_runs_lists_a_run_with_a_bad_result_file_and_its_problem(tmp_path, capsys):
    for name, final in (("good", '{"top1": 0.7}'), ("word", '{"top1": "high"}'), ("corrupt", "{bad")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.yaml").write_text(yaml.safe_dump({"augment": {}, "model": {"name": "rs50"}}))
        (tmp_path / name / "final_metrics.json").write_text(final)
    assert main(["runs", str(tmp_path), "--json"]) == 0
    rows = {row["folder"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["good"]["value"] == 0.7 and rows["word"]["value"] is None and rows["word"]["finished"]
    assert "corrupt/final_metrics.json is not readable JSON" in rows["corrupt"]["problem"]
    assert main(["runs", str(tmp_path)]) == 0
