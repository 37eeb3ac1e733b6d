import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from rs_transfer.errors import StoppedBySignal, UserError
from rs_transfer.files import FileWriteError
from rs_transfer.models import create_model
from rs_transfer.pretrain import cotrain, data, pseudo_label, transforms
from rs_transfer.pretrain.synthetic import make_image, write_shards

NUM_CLASSES = 3


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pth"
    net = create_model("rs26-w0.25", num_classes=NUM_CLASSES, init="timm")
    torch.nn.init.normal_(net.fc.weight, std=1.0)  # a confident teacher, so confidences spread out
    torch.save({"net." + k: v for k, v in net.state_dict().items()}, path)  # keys as a pretrain checkpoint has them
    return path


@pytest.fixture(scope="module")
def unlabelled(tmp_path_factory):
    rng = np.random.default_rng(0)
    samples = [(f"img{i:03d}", make_image(i % NUM_CLASSES, NUM_CLASSES, (40 + i % 7, 36), rng), -1) for i in range(22)]
    return write_shards(tmp_path_factory.mktemp("unlabelled"), samples, per_shard=8, labelled=False)[0].parent


def _run(teacher, images, out, **kwargs):
    args = dict(model_name="rs26-w0.25", image_size=32, batch_size=4, topk=2, threshold=0.0, num_workers=0)
    args.update(kwargs)
    return pseudo_label.label_images(str(teacher), str(images), str(out), **args)


def test_pseudo_label_round_trip_and_resume_after_interruption(teacher, unlabelled, tmp_path):
    full = _run(teacher, unlabelled, tmp_path / "full")
    assert full["labelled"] == 22 and full["selected"] == 22 and full["num_classes"] == NUM_CLASSES
    lines = (tmp_path / "full" / "rank00000-of-00001.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["ref"] for r in records] == [item.ref for item in data.list_images(unlabelled)]
    for r in records:
        assert 0 <= r["label"] < NUM_CLASSES and r["topk"][0] == [r["label"], r["confidence"]]
        assert r["topk"][0][1] >= r["topk"][1][1]

    # Interrupted: two batches written, then a kill in the middle of a line.
    out = tmp_path / "resumed"
    assert _run(teacher, unlabelled, out, max_batches=2) == {}
    shard = out / "rank00000-of-00001.jsonl"
    assert len(shard.read_text().splitlines()) == 8
    with shard.open("a") as file:
        file.write('{"ref": "img008", "lab')
    resumed = _run(teacher, unlabelled, out)
    assert resumed["labelled"] == 22
    assert shard.read_text() == (tmp_path / "full" / "rank00000-of-00001.jsonl").read_text()
    assert (out / "selected.jsonl").read_text() == (tmp_path / "full" / "selected.jsonl").read_text()


def test_pseudo_label_skips_unreadable_images_and_refuses_another_world_size(teacher, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    make_image(0, NUM_CLASSES, (40, 40), np.random.default_rng(0)).save(folder / "good.png")
    (folder / "bad.jpg").write_bytes(b"\xff\xd8 broken")
    meta = _run(teacher, folder, tmp_path / "out")
    assert meta["labelled"] == 2 and meta["unreadable"] == 1 and meta["selected"] == 1
    (tmp_path / "out" / "rank00001-of-00002.jsonl").write_text("")
    with pytest.raises(UserError, match="another number of ranks"):
        _run(teacher, folder, tmp_path / "out")


def test_selection_filters_by_confidence_and_balances_classes():
    records = [
        {"ref": "a", "label": 0, "confidence": 0.9},
        {"ref": "b", "label": 0, "confidence": 0.5},
        {"ref": "c", "label": 0, "confidence": 0.7},
        {"ref": "d", "label": 1, "confidence": 0.8},
        {"ref": "e", "label": 1, "confidence": 0.2},
        {"ref": "f", "label": 2, "confidence": 0.1},
        {"ref": "g", "label": -1, "confidence": 0.0, "error": "unknown image format"},
    ]
    assert [r["ref"] for r in pseudo_label.select(records, 0.3, 0)] == ["a", "c", "b", "d"]
    # Two per class: the most confident ones of class 0, class 1's only survivor duplicated, class 2 filtered out.
    assert [r["ref"] for r in pseudo_label.select(records, 0.3, 2)] == ["a", "c", "d", "d"]


def _pseudo_dataset(tmp_path, teacher, unlabelled):
    _run(teacher, unlabelled, tmp_path / "pl", topk=2)
    return cotrain.load_pseudo_set(tmp_path / "pl", transforms.eval_transform(16), NUM_CLASSES)


def test_batches_mix_labelled_and_pseudo_at_the_data_ratio(teacher, unlabelled, tmp_path):
    pseudo = _pseudo_dataset(tmp_path, teacher, unlabelled)
    items = [data.Item(f"l{i}", i % NUM_CLASSES, unlabelled_item.where)
             for i, unlabelled_item in enumerate(data.list_images(unlabelled)[:6])]
    labelled = data.ImageDataset(items, transforms.eval_transform(16))
    for ratio, batch_size, expected in ((1.0, 8, 4), (3.0, 8, 6), (0.5, 9, 3), (3.0, 6, 4)):
        collate = cotrain.MixedCollate(labelled, pseudo, ratio, NUM_CLASSES, 0.1, "soft")
        batch = collate(list(range(batch_size)))
        assert int(batch["num_pseudo"]) == expected == cotrain.pseudo_count(batch_size, ratio)
        assert batch["image"].shape == (batch_size, 3, 16, 16)
        targets = batch["target"]
        assert torch.allclose(targets.sum(dim=1), torch.ones(batch_size))
        n_labelled = batch_size - expected
        for row, slot in zip(targets[:n_labelled], range(n_labelled)):  # one-hot with smoothing 0.1
            assert row.max().item() == pytest.approx(0.9 + 0.1 / NUM_CLASSES)
            assert row.argmax().item() == items[slot % 6].label
        for row, slot in zip(targets[n_labelled:], range(n_labelled, batch_size)):  # the teacher's top-2, renormalised
            record = pseudo.targets[slot % len(pseudo)]
            (c1, p1), (c2, p2) = record["topk"]
            assert row[c1].item() == pytest.approx(p1 / (p1 + p2), abs=1e-5)
            assert (row > 0).sum() <= 2
    hard = cotrain.MixedCollate(labelled, pseudo, 1.0, NUM_CLASSES, 0.0, "hard")(list(range(4)))
    assert set(hard["target"].flatten().tolist()) == {0.0, 1.0}
    assert cotrain.SlotDataset(10)[7] == 7 and len(cotrain.SlotDataset(10)) == 10


@pytest.mark.slow  # a subprocess that imports torch, killed with SIGKILL while it writes
def test_pseudo_label_resumes_after_sigkill(teacher, tmp_path):
    rng = np.random.default_rng(1)
    samples = [(f"k{i:03d}", make_image(i % NUM_CLASSES, NUM_CLASSES, (36, 36), rng), -1) for i in range(80)]
    images = write_shards(tmp_path / "images", samples, per_shard=40, labelled=False)[0].parent
    out = tmp_path / "killed"
    shard = out / "rank00000-of-00001.jsonl"
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "rs_transfer", "pseudo-label", "--teacher", str(teacher), "--images", str(images),
               "--out", str(out), "--model", "rs26-w0.25", "--image-size", "32", "--batch-size", "1", "--topk", "2",
               "--threshold", "0", "--num-workers", "0"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not (shard.exists() and shard.read_bytes().count(b"\n") >= 5):
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    written = shard.read_bytes().count(b"\n")
    assert 5 <= written < 80 and not (out / "selected.jsonl").exists()
    meta = _run(teacher, images, out, batch_size=1)
    assert meta["labelled"] == 80
    full = _run(teacher, images, tmp_path / "full", batch_size=1)
    assert full["labelled"] == 80
    assert shard.read_text() == (tmp_path / "full" / "rank00000-of-00001.jsonl").read_text()


def test_out_folder_on_a_read_only_disk_is_one_error_line(teacher, unlabelled, tmp_path, monkeypatch):
    out = tmp_path / "read_only" / "pl"
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):  # as on a read-only disk (root ignores permission bits, so tests cannot)
        if self == out:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    with pytest.raises(FileWriteError, match=rf"^cannot create the pseudo-label folder {out}: Read-only file system$"):
        _run(teacher, unlabelled, out)


def test_full_disk_while_labelling_keeps_the_lines_before_and_a_rerun_finishes(teacher, unlabelled, tmp_path,
                                                                             monkeypatch):
    full = _run(teacher, unlabelled, tmp_path / "full")
    out = tmp_path / "filled"
    real_fsync = os.fsync
    calls = []

    def fsync(fd):
        calls.append(fd)
        if len(calls) == 3:  # the third batch: the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    shard = out / "rank00000-of-00001.jsonl"
    with pytest.raises(FileWriteError, match=rf"^cannot write pseudo-label shard {shard}: No space left on device; "
                                             r"the 8 labels written before are kept, rerun to continue$"):
        _run(teacher, unlabelled, out)
    monkeypatch.undo()
    reference = (tmp_path / "full" / "rank00000-of-00001.jsonl").read_text().splitlines(keepends=True)
    assert shard.read_text().splitlines(keepends=True)[:8] == reference[:8]
    assert _run(teacher, unlabelled, out) == full
    assert (out / "selected.jsonl").read_text() == (tmp_path / "full" / "selected.jsonl").read_text()


def test_a_stop_signal_finishes_the_batch_then_stops_and_restores_the_handlers(teacher, unlabelled, tmp_path,
                                                                               monkeypatch):
    real_getitem = pseudo_label._Images.__getitem__

    def getitem(self, index):
        if index == 5:  # in the second batch of 4
            os.kill(os.getpid(), signal.SIGUSR1)
        return real_getitem(self, index)

    monkeypatch.setattr(pseudo_label._Images, "__getitem__", getitem)
    received = []
    # A handler of the caller's own, which label_images must put back (and which keeps pytest alive without one).
    previous = signal.signal(signal.SIGUSR1, lambda number, frame: received.append(number))
    try:
        with pytest.raises(StoppedBySignal, match=r"^stopped by SIGUSR1 after 8 of 22 images on rank 0; rerun the "
                                                  r"same command to continue$") as stopped:
            _run(teacher, unlabelled, tmp_path / "out")
        assert stopped.value.exit_code == 128 + signal.SIGUSR1
        os.kill(os.getpid(), signal.SIGUSR1)
        assert received == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert len((tmp_path / "out" / "rank00000-of-00001.jsonl").read_text().splitlines()) == 8


@pytest.mark.slow  # two subprocesses that import torch
def test_sigterm_to_the_cli_stops_with_143_and_a_rerun_finishes(teacher, tmp_path):
    rng = np.random.default_rng(2)
    samples = [(f"t{i:03d}", make_image(i % NUM_CLASSES, NUM_CLASSES, (36, 36), rng), -1) for i in range(80)]
    images = write_shards(tmp_path / "images", samples, per_shard=40, labelled=False)[0].parent
    out = tmp_path / "stopped"
    shard = out / "rank00000-of-00001.jsonl"
    process = subprocess.Popen(_cli_command(teacher, images, out), env=_cli_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not (shard.exists() and shard.read_bytes().count(b"\n") >= 1):
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGTERM)  # as SLURM does: the whole process group
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == 143, stderr
    raw = shard.read_bytes()
    written = raw.count(b"\n")
    assert raw.endswith(b"\n") and all(json.loads(line)["ref"] for line in raw.decode().splitlines())
    assert stderr.strip().splitlines()[-1] == (f"stopped: stopped by SIGTERM after {written} of 80 images on rank 0; "
                                               "rerun the same command to continue")
    assert written < 80 and not (out / "selected.jsonl").exists()
    rerun = subprocess.run(_cli_command(teacher, images, out), env=_cli_env(), capture_output=True, text=True,
                           timeout=240)
    assert rerun.returncode == 0, rerun.stderr
    assert _run(teacher, images, tmp_path / "full", batch_size=1)["labelled"] == 80
    assert (out / "selected.jsonl").read_text() == (tmp_path / "full" / "selected.jsonl").read_text()


def _cli_command(teacher, images, out) -> list:
    return [sys.executable, "-m", "rs_transfer", "pseudo-label", "--teacher", str(teacher), "--images", str(images),
            "--out", str(out), "--model", "rs26-w0.25", "--image-size", "32", "--batch-size", "1", "--topk", "2",
            "--threshold", "0", "--num-workers", "0"]


def _cli_env() -> dict:
    repo = str(Path(__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1"}
