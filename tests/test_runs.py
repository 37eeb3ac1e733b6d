"""The end-of-run summary (OUTPUT_DIR/summary.json) and `rs-transfer runs DIR`: toy runs trained by the engine
(tests/engine_toy.py) and hand-written run folders of a transfer task, a pretraining and a video run."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from torch.utils.data import Dataset

from engine_toy import make_task, script_env, toy_config
from rs_transfer.cli import main
from rs_transfer.engine import checkpoint as ckpt
from rs_transfer.engine.summary import SUMMARY_FILE
from rs_transfer.families import family_of_config
from rs_transfer.runs import find_runs, sort_runs
from rs_transfer.engine.trainer import train


def events(out, kind: str) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [event for event in map(json.loads, lines) if event["kind"] == kind]


def write_run(folder, config: dict, final: dict | None = None, summary: dict | None = None) -> None:
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    if final is not None:
        (folder / "final_metrics.json").write_text(json.dumps(final))
    if summary is not None:
        (folder / SUMMARY_FILE).write_text(json.dumps(summary))


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory):
    """Two trained toy runs, and hand-written folders as runs of each family leave them (before summary.json)."""
    root = tmp_path_factory.mktemp("runs")
    train(toy_config(root / "toy" / "short", "train.epochs=1", "train.lr=0.01"), make_task())
    train(toy_config(root / "toy" / "long", "train.epochs=3"), make_task())
    write_run(root / "table5" / "pascal_seg", {"task": {"name": "pascal_seg", "crop_size": 512},
                                               "model": {"name": "rs101"}},
              final={"pixel_acc": 0.95, "miou": 0.81})
    write_run(root / "pretrain" / "rs50_i160", {"model": {"name": "rs50"}, "augment": {"randaugment": "tf"},
                                                "cotrain": {"enabled": False}},
              final={"top5": 0.93, "top1": 0.785})
    write_run(root / "video" / "rs50", {"model": {"name": "rs50"}, "data": {"clip_frames": 32}},
              final={"top1": 0.7, "top5": 0.9})
    write_run(root / "video" / "killed", {"model": {"name": "rs101"}, "data": {"clip_frames": 16}})
    (root / "video" / "killed" / "checkpoints").mkdir()
    for step in (8, 12):
        (root / "video" / "killed" / "checkpoints" / f"step_{step:08d}.pt").write_bytes(b"")
    (root / "notes").mkdir()
    (root / "notes" / "readme.txt").write_text("not a run")
    return root


def test_summary_json_agrees_with_the_metrics_file(tmp_path):
    out = tmp_path / "run"
    metrics = train(toy_config(out, "train.epochs=4", "train.eval_every_epochs=1"), make_task())
    summary = json.loads((out / SUMMARY_FILE).read_text())
    evaluations = events(out, "eval")
    best = max(evaluations, key=lambda event: event["accuracy"])  # max keeps the first of equals, like the engine
    assert summary["metric"] == "accuracy" and summary["value"] == metrics["accuracy"]
    assert (summary["best_step"], summary["best_value"]) == (best["step"], best["accuracy"])
    assert summary["best_value"] == ckpt.load(out / "checkpoints" / "best.pt")["best"]
    assert summary["steps"] == 64 and summary["batch_size"] == 16
    assert 0 < summary["train_s"] <= summary["wall_s"]
    assert summary["images_per_s"] == pytest.approx(64 * 16 / summary["train_s"], rel=1e-2)
    assert summary["output_dir"] == str(out.resolve())
    assert all((out / path).exists() for path in summary["outputs"].values())
    # final_metrics.json is unchanged: the final evaluation alone
    assert json.loads((out / "final_metrics.json").read_text()) == metrics


class StallsThenFails(Dataset):
    """The toy training set, 0.5 s slow on its first sample and failing at sample `fail_at`: a run that loses
    time, checkpoints, and dies."""

    def __init__(self, inner: Dataset, fail_at: int):
        self.inner, self.fail_at, self.fetched = inner, fail_at, 0

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i):
        self.fetched += 1
        if self.fetched == 1:
            time.sleep(0.5)
        if self.fetched == self.fail_at:
            raise RuntimeError("the machine went down")
        return self.inner[i]


def test_wall_time_adds_up_over_a_killed_and_resumed_run(tmp_path):
    out = tmp_path / "run"
    settings = ["train.epochs=2", "train.checkpoint_every_steps=4"]
    task = make_task()
    task.train_set = StallsThenFails(task.train_set, fail_at=16 * 10 + 5)  # dies in step 11, after checkpoint 8
    with pytest.raises(RuntimeError, match="went down"):
        train(toy_config(out, *settings), task)
    assert not (out / SUMMARY_FILE).exists()
    killed = torch.load(ckpt.step_checkpoints(out / "checkpoints")[-1], weights_only=True)
    assert killed["step"] == 8 and 0.5 <= killed["train_s"] <= killed["wall_s"]

    started = time.perf_counter()
    train(toy_config(out, *settings, "train.resume=auto"), make_task())
    resumed_seconds = time.perf_counter() - started
    summary = json.loads((out / SUMMARY_FILE).read_text())
    # The first segment's time up to its checkpoint, plus the resumed segment's (the steps redone after the kill
    # are counted once)
    assert killed["wall_s"] < summary["wall_s"] <= killed["wall_s"] + resumed_seconds
    assert killed["train_s"] < summary["train_s"] <= summary["wall_s"]
    assert summary["images_per_s"] == pytest.approx(32 * 16 / summary["train_s"], rel=1e-2)
    best = max(events(out, "eval"), key=lambda event: event["accuracy"])
    assert (summary["best_step"], summary["best_value"]) == (best["step"], best["accuracy"])


def test_the_family_of_a_run_from_the_keys_each_family_declares():
    assert family_of_config({"task": {"name": "nyu_depth"}, "model": {"name": "rs50"}}) == ("transfer", "nyu_depth")
    assert family_of_config({"augment": {}, "cotrain": {}, "data": {"image_size": 160}}) == ("pretrain", None)
    assert family_of_config({"cotrain": {"enabled": True}}) == ("pretrain", None)
    assert family_of_config({"data": {"clip_frames": 32}}) == ("video", None)
    assert family_of_config({"model": {"name": "rs50"}, "data": {"root": None}}) == ("other", None)


def test_runs_lists_the_right_metric_for_each_run(runs_root):
    rows = {row["folder"]: row for row in find_runs(runs_root)}
    assert set(rows) == {"toy/short", "toy/long", "table5/pascal_seg", "pretrain/rs50_i160", "video/rs50",
                         "video/killed"}
    for folder in ("toy/short", "toy/long"):
        final = json.loads((runs_root / folder / "final_metrics.json").read_text())
        summary = json.loads((runs_root / folder / SUMMARY_FILE).read_text())
        assert rows[folder]["metric"] == "accuracy" and rows[folder]["value"] == final["accuracy"]
        assert rows[folder]["wall_s"] == summary["wall_s"] and rows[folder]["finished"]
        assert (rows[folder]["family"], rows[folder]["backbone"]) == ("other", "rs50")
    seg = rows["table5/pascal_seg"]
    assert (seg["family"], seg["task"], seg["backbone"], seg["metric"], seg["value"]) == (
        "transfer", "pascal_seg", "rs101", "miou", 0.81)
    assert (rows["pretrain/rs50_i160"]["family"], rows["pretrain/rs50_i160"]["metric"],
            rows["pretrain/rs50_i160"]["value"]) == ("pretrain", "top1", 0.785)
    assert (rows["video/rs50"]["family"], rows["video/rs50"]["metric"], rows["video/rs50"]["value"]) == (
        "video", "top1", 0.7)
    killed = rows["video/killed"]
    assert not killed["finished"] and killed["step"] == 12 and killed["value"] is None
    assert all(row["finished"] for name, row in rows.items() if name != "video/killed")


def test_runs_sorting(runs_root):
    rows = find_runs(runs_root)
    by_metric = [row["folder"] for row in sort_runs(rows, "metric")]
    # one group per family/task and metric (never a top-1 ranked against an mIoU), highest first, no value last
    assert by_metric == ["toy/long", "toy/short", "pretrain/rs50_i160", "table5/pascal_seg", "video/rs50",
                         "video/killed"] or by_metric == ["toy/short", "toy/long", "pretrain/rs50_i160",
                                                          "table5/pascal_seg", "video/rs50", "video/killed"]
    toy = [row["value"] for row in sort_runs(rows, "metric")[:2]]
    assert toy == sorted(toy, reverse=True)
    by_time = [row["folder"] for row in sort_runs(rows, "time")]
    assert set(by_time[:2]) == {"toy/short", "toy/long"}  # the only runs with a wall time
    assert by_time[2:] == sorted(by_time[2:])  # the rest by name
    assert [row["folder"] for row in sort_runs(rows, "name")] == sorted(row["folder"] for row in rows)


def test_runs_command(runs_root, capsys):
    assert main(["runs", str(runs_root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["folder", "family/task", "backbone", "metric", "value", "wall", "time", "status"]
    assert lines[1].startswith("toy/long")  # the highest value: about 0.9 (0.785 to 0.81 for the hand-written)
    seg = next(line for line in lines if line.startswith("table5/pascal_seg"))
    assert seg.split()[1:5] == ["transfer/pascal_seg", "rs101", "miou", "0.8100"]
    assert lines[-1].startswith("video/killed") and "unfinished (step 12)" in lines[-1]

    assert main(["runs", str(runs_root), "--sort", "name", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [row["folder"] for row in listed] == sorted(row["folder"] for row in listed)

    assert main(["runs", str(runs_root / "missing")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: ") and "missing" in error[0]


def test_listing_runs_with_summaries_imports_no_torch(runs_root):
    code = ("import sys; from rs_transfer.cli import main; code = main(['runs', sys.argv[1]]); "
            "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", code, str(runs_root / "toy")], env=script_env(),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert [line.split()[0] for line in done.stdout.splitlines()] == ["folder", "long", "short"]


def test_the_summary_table_labels_throughput_by_what_a_sample_is():
    from rs_transfer.engine.summary import format_summary, run_summary
    from rs_transfer.families import declaration

    summary = run_summary(Path("."), "top1", {"top1": 0.5}, 0.5, 2, 4, 8, 10.0, 8.0, family="video", task="video")
    assert summary["images_per_s"] == 4.0  # the JSON key stays for every family
    assert (summary["family"], summary["task"]) == ("video", "video")
    video, pretrain = declaration("video").sample_unit, declaration("pretrain").sample_unit
    assert "clips/s" in format_summary(summary, video) and "images/s" not in format_summary(summary, video)
    assert "images/s" in format_summary(summary, pretrain) and "images/s" in format_summary(summary)


def test_runs_diff_names_each_differing_key_and_what_it_changes(runs_root, capsys):
    short, long = runs_root / "toy" / "short", runs_root / "toy" / "long"
    assert main(["runs", "--diff", str(short), str(long), "--json"]) == 0
    rows = {row["key"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["train.epochs"] == {"key": "train.epochs", "a": 1, "b": 3, "kind": "run"}
    assert rows["train.lr"]["a"] == 0.01 and rows["train.lr"]["kind"] == "run"
    assert rows["output_dir"]["kind"] == "location" and "git_commit" not in rows  # same code, same commit
    assert main(["runs", "--diff", str(short), str(short)]) == 0
    assert capsys.readouterr().out.strip() == f"{short} and {short} have the same config"
    assert main(["runs", "--diff", str(short), str(runs_root / "video" / "rs50")]) == 0
    text = capsys.readouterr().out.splitlines()
    assert text[0].split()[0] == "key" and any(line.split()[:3] == ["data.clip_frames", "(absent)", "32"]
                                                for line in text)
    assert main(["runs", "--diff", str(short), str(runs_root / "notes")]) == 2
    assert "has no config.yaml" in capsys.readouterr().err
    assert main(["runs"]) == 2 and "give a FOLDER to list, or --diff RUN_A RUN_B" in capsys.readouterr().err


def test_the_start_blocks_epoch_count_is_plain_digits():
    from rs_transfer.engine.summary import format_count

    # the GPU protocol on a 96-image folder planned "10000 steps (1e+04 epochs)" (the `g` format)
    assert [format_count(x) for x in (10000.0, 200 / 3, 4.0, 0.0012)] == ["10000", "66.67", "4", "0.0012"]
