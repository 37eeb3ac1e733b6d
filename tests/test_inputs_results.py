"""Result files a run left behind (final_metrics.json, sweep.json) as commands read them back: corrupt, of another
task, or hand-edited. Every reader is engine/summary.py's `read_final_metrics`; a bad file is one `error:` line
naming it, never a traceback, and `rs-transfer runs` lists it with the problem instead of failing. The same for
every other JSON the toolkit reads back (sweep.json, index.json, plan.json, pseudo-label headers, ...): cut short,
of the wrong types, with absurd numbers or nesting."""

import json
from pathlib import Path

import pytest
import yaml

from rs_transfer.cli import main
from rs_transfer.downstream import finetune
from rs_transfer.engine.summary import read_final_metrics
from rs_transfer.errors import DataError, UserError

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


def _readers() -> dict:
    """{name: (file name, read(folder), content of the right JSON type with a wrong type or absurd value inside)}:
    every JSON file the toolkit reads back, through the function its commands call."""
    from rs_transfer.bench.latency import LatencyResult
    from rs_transfer.downstream import coco_det
    from rs_transfer.predict import check_out
    from rs_transfer.pretrain import pseudo_label, shards
    from rs_transfer.reproduce import scaling, table5, table7
    from rs_transfer.video import lists

    latency = dict(model="rs50", resolution="160", device="cpu", dtype="fp32", channels_last=False, start_batch=8,
                   batch=8, train_step_s=1.0, train_s_per_128=16.0, train_img_s=8.0, infer_batch=8, infer_img_s=20.0,
                   peak_mem_gb=None, warmup=1, repeats=3)
    assert [f for f in LatencyResult.__dataclass_fields__ if f not in latency] == [
        "train_step_times_s", "torch_version", "compiled", "compile_backend", "compile_s"]
    header = {"format": pseudo_label.FORMAT, "topk": 2, "images": "x", "samples": "7", "k": 2, "num_classes": 3}
    expected = {"topk": 2, "images": "x", "samples": 7, "images_digest": None}
    return {
        "final_metrics.json": ("final_metrics.json", lambda d: read_final_metrics(d, "top1"), '{"top1": "0.5"}'),
        "sweep.json": ("sweep.json", lambda d: table5._read_result(d, "cifar100"), '{"best": {"top1": [1]}}'),
        "index.json": ("index.json", shards.read_index, '{"shardlist": [{"url": "a.tar", "nsamples": 1000000000000}]}'),
        "index.json labels": ("index.json", shards.read_index,
                              '{"shardlist": [{"url": "a.tar", "nsamples": 1}], "rs_transfer": {"label_counts": 5}}'),
        "pseudo-label meta.json": ("meta.json", pseudo_label.read_selection,
                                   f'{{"format": {pseudo_label.FORMAT}, "table": "/etc", "samples": 7}}'),
        "pseudo-label rank header": (pseudo_label.header_path(Path(), 0, 1).name,
                                     lambda d: pseudo_label._start_rank_file(d, 0, 1, expected, None, "rs26"),
                                     json.dumps(header)),
        "predictions.json": ("predictions.json", lambda d: check_out(d, d), '{"run": 5, "predictions": 3}'),
        "video class names": ("classids.json", lambda d: lists._json_names(d / "classids.json"), '{"a": "0"}'),
        "bench table7 --from": ("t.json", lambda d: table7.load_results(d / "t.json"), json.dumps([latency])),
        "scaling.json": ("scaling.json", table7.load_study,
                         '{"latency_source": "run", "points": [{"model": "rs50", "resolution": 160, "epochs": 10, '
                         '"top1": "high", "latency_s_per_128": null, "gflops": 1.0}]}'),
        "plan.json": ("plan.json", scaling.load_plan, '{"points": 5}'),
        "COCO instances": ("instances.json", lambda d: coco_det.read_json(d / "instances.json"),
                           '{"images": {}, "annotations": [], "categories": []}'),
    }


BROKEN_JSON = {
    "cut short": '{"points": [1, 2',
    "a list": "[1, 2, 3]",
    "wrong types": None,  # each reader's own (_readers)
    "1e999": '{"top1": 1e999, "points": 1e999, "shardlist": 1e999, "best": 1e999, "format": 1e999}',
    "a 5000-digit number": '{"top1": 1' + "0" * 5000 + "}",
    "nested 100000 deep": "[" * 100_000 + "]" * 100_000,
    "not UTF-8": b"\xff\xfe{\x00",
}


@pytest.mark.parametrize("broken", BROKEN_JSON)
@pytest.mark.parametrize("reader", list(_readers()))
def test_every_json_read_back_is_one_error_naming_the_file(reader, broken, tmp_path):
    # A truncated, hand-edited or hostile file is one UserError line naming it (the CLI prints `error: ...`),
    # never a RecursionError, ValueError, TypeError or KeyError from inside the reader.
    name, read, wrong_types = _readers()[reader]
    content = wrong_types if BROKEN_JSON[broken] is None else BROKEN_JSON[broken]
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(UserError) as error:
        read(tmp_path)
    message = str(error.value)
    assert name in message and "\n" not in message and len(message) < 600, message


def test_runs_lists_a_run_whose_summary_json_is_broken_with_the_problem(tmp_path, capsys):
    for name, summary in (("list", "[1]"), ("types", '{"metric": ["top1"], "value": "x", "steps": "7"}'),
                          ("deep", "[" * 100_000 + "]" * 100_000)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.yaml").write_text(yaml.safe_dump({"augment": {}, "model": {"name": ["rs50"]}}))
        (tmp_path / name / "summary.json").write_text(summary)
    assert main(["runs", str(tmp_path)]) == 0  # before: an AttributeError (a list has no ljust) or RecursionError
    capsys.readouterr()
    assert main(["runs", str(tmp_path), "--json"]) == 0
    rows = {row["folder"]: row for row in json.loads(capsys.readouterr().out)}
    assert "list/summary.json holds a JSON list" in rows["list"]["problem"]
    assert "deep/summary.json is not readable JSON (nested too deeply)" in rows["deep"]["problem"]
    assert rows["types"]["finished"] and rows["types"]["metric"] is None and rows["types"]["step"] is None
    assert all(row["backbone"] is None for row in rows.values())


def test_a_metrics_jsonl_line_that_is_no_event_is_dropped_with_a_warning(tmp_path, caplog):
    from rs_transfer.engine.run_log import read_events

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "train", "step": 1}\n[1, 2]\n' + "[" * 100_000 + "]" * 100_000 + "\n"
                    + '{"kind": "eval", "step": 1' + "0" * 5000 + "}\n")
    assert read_events(path) == [{"kind": "train", "step": 1}]
    assert caplog.text.count("is not a complete JSON record") == 3
