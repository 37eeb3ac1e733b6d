"""The optional trackers (engine/trackers.py) for real, without a network: W&B in offline mode (its .wandb record
file read back), MLflow on a local file store (read back with its client)."""

import json
import struct
import sys

import pytest

from engine_toy import make_task, toy_config
from rs_transfer.config import ConfigError
from rs_transfer.engine import trackers
from rs_transfer.engine.trainer import train
from rs_transfer.errors import UserError


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """W&B offline and quiet, its settings and caches in tmp; MLflow's file store in tmp (MLflow 3 refuses a file
    store unless MLFLOW_ALLOW_FILE_STORE is set: it wants a database, which mlflow-skinny cannot open)."""
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb_home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_ID", "WANDB_RESUME", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path / 'mlruns'}")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"file:{tmp_path / 'mlruns'}")


TOY = ("train.epochs=null", "train.steps=8", "train.checkpoint_every_steps=4", "train.keep_last=0",
       "train.loggers=[tensorboard,wandb,mlflow]")


def test_each_tracker_gets_the_config_every_scalar_and_the_final_metrics(tmp_path, offline):
    out = tmp_path / "run"
    metrics = train(toy_config(out, *TOY), make_task())
    ids = json.loads((out / "trackers.json").read_text())
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = {e["step"]: e["loss"] for e in events if e["kind"] == "train"}
    assert sorted(losses) == [4, 8]

    run_id = ids["mlflow"]["run_id"]
    run = offline.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["train.lr"] == "1.6" and run.data.params["output_dir"] == str(out)
    assert {m.step: m.value for m in offline.get_metric_history(run_id, "train/loss")} == losses
    assert [m.step for m in offline.get_metric_history(run_id, "eval/accuracy")] == [8]
    assert run.data.metrics["final/accuracy"] == metrics["accuracy"]
    assert run.data.metrics["summary/steps"] == 8
    # the file store (here tmp_path/mlruns) keeps the config as an artifact: `runs` listed it as an unfinished run
    from rs_transfer.runs import find_runs

    assert [row["folder"] for row in find_runs(tmp_path)] == ["run"]

    records = wandb_records(out, ids["wandb"]["id"])
    assert len(records) == 1  # one offline segment
    run_record, history, summary = records[0]
    assert run_record.run_id == ids["wandb"]["id"] and run_record.display_name == "run"
    config = {item.key: json.loads(item.value_json) for item in run_record.config.update}
    assert config["train"]["lr"] == 1.6 and config["output_dir"] == str(out)
    assert {step: row["train/loss"] for step, row in history.items() if "train/loss" in row} == losses
    assert history[8]["eval/accuracy"] == metrics["accuracy"]
    assert summary["final/accuracy"] == metrics["accuracy"] and summary["summary/steps"] == 8


def test_a_resumed_run_continues_the_same_tracker_runs_without_sending_a_step_twice(tmp_path, offline):
    # The first run logged steps 4 and 8 and then "died" before its step-8 checkpoint: the resume starts at 4.
    out = tmp_path / "run"
    train(toy_config(out, *TOY), make_task())
    first = json.loads((out / "trackers.json").read_text())
    (out / "checkpoints" / "step_00000008.pt").unlink()
    train(toy_config(out, *TOY, "train.steps=12", "train.resume=auto"), make_task())
    assert json.loads((out / "trackers.json").read_text()) == first

    run_id = first["mlflow"]["run_id"]
    assert [r.info.run_id for r in offline.search_runs([offline.get_run(run_id).info.experiment_id])] == [run_id]
    assert offline.get_run(run_id).info.status == "FINISHED"
    # Step 8 once: the killed run's value (an exact resume would compute the same; this one's schedule is longer)
    assert [m.step for m in offline.get_metric_history(run_id, "train/loss")] == [4, 8, 12]
    assert [m.step for m in offline.get_metric_history(run_id, "eval/accuracy")] == [8, 12]

    segments = wandb_records(out, first["wandb"]["id"])
    assert [run.run_id for run, _, _ in segments] == [first["wandb"]["id"]] * 2
    assert [sorted(history) for _, history, _ in segments] == [[4, 8], [12]]  # W&B steps only increase


def test_a_missing_tracker_package_is_one_error_naming_the_extra_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed: find_spec and import both fail
    with pytest.raises(ConfigError, match=r'^train.loggers names mlflow, but the mlflow package is not installed: '
                                          r'pip install -e "\.\[mlflow\]"'):
        train(toy_config(tmp_path / "run", "train.loggers=[mlflow]"), make_task())
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match=r"train.loggers=\['tensorboard', 'neptune'\] makes no sense here: it must"
                                          " be one of tensorboard, wandb, mlflow"):
        toy_config(tmp_path, "train.loggers=[tensorboard,neptune]")


def test_a_tracker_that_cannot_start_is_one_error(tmp_path, offline, monkeypatch):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path / 'other'}")  # MLflow caches the store of a URI
    with pytest.raises(UserError, match="^train.loggers: mlflow could not start its run: The filesystem tracking"):
        train(toy_config(tmp_path / "run", "train.epochs=null", "train.steps=4", "train.loggers=[mlflow]"), make_task())


def test_mlflows_default_store_without_the_full_package_says_the_fix_first(tmp_path, offline, monkeypatch):
    # a fresh install (the mlflow extra is mlflow-skinny) and no MLFLOW_TRACKING_URI: MLflow's answer named no fix
    # (MLflow 3's default store is sqlite:///mlflow.db; the test environment has mlflow-skinny, no SQLAlchemy)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    (tmp_path / "run").mkdir()
    with pytest.raises(UserError, match=r"^train.loggers: mlflow could not start its run: an sqlite store \(MLflow 3's "
                                        r"default, sqlite:///mlflow.db\) needs the full mlflow package: pip install "
                                        r"mlflow, or set MLFLOW_TRACKING_URI=file:./mlruns"):
        trackers.start_trackers(tmp_path / "run", ["mlflow"], {"seed": 0}, resumed=False)


def test_a_tracker_failing_mid_run_is_one_warning_and_the_run_goes_on(tmp_path, offline, monkeypatch, caplog):
    calls = []

    def full_disk(self, values, step):
        calls.append(step)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(trackers.MlflowTracker, "log", full_disk)
    out = tmp_path / "run"
    metrics = train(toy_config(out, "train.epochs=null", "train.steps=8", "train.loggers=[mlflow]"), make_task())
    assert calls == [4]  # off after the first failure
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warned == ["MLflow failed ([Errno 28] No space left on device): it is off for the rest of this run; "
                      "metrics.jsonl and TensorBoard go on"]
    assert json.loads((out / "final_metrics.json").read_text()) == metrics
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3  # train 4, 8 and eval 8
    assert not (out / "tensorboard").exists()  # not in train.loggers
    run_id = json.loads((out / "trackers.json").read_text())["mlflow"]["run_id"]
    assert offline.get_run(run_id).info.status == "KILLED"


def wandb_records(out, run_id: str) -> list:
    """Each offline segment of W&B run `run_id` in OUTPUT_DIR/wandb, oldest first, as (its run record, {step:
    {name: value}} of its history, its last summary values). The .wandb file is W&B's LevelDB-style log of
    protobuf Records (wandb/sdk/internal/datastore.py in wandb < 0.22): a 7-byte header, then 32 KiB blocks of
    chunks, each (crc32, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    segments = []
    # offline-run-TIME-ID, and offline-run-TIME-ID-1 for a second segment started in the same second
    for path in sorted((out / "wandb").glob(f"offline-run-*-{run_id}*/run-{run_id}.wandb")):
        data, pos, block, pending = path.read_bytes(), 7, 32768, b""
        assert data[:4] == b":W&B"
        run, history, summary = None, {}, {}
        while pos + 7 <= len(data):
            if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
                pos += block - pos % block
                continue
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            pending, pos = pending + data[pos + 7:pos + 7 + length], pos + 7 + length
            if kind not in (1, 4):
                continue
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            values = lambda items: {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                    for item in items}
            if record.HasField("run"):
                run = record.run
            elif record.HasField("history"):
                row = values(record.history.item)
                history[row["_step"]] = row
            elif record.HasField("summary"):
                summary.update(values(record.summary.update))
        segments.append((run, history, summary))
    return segments
