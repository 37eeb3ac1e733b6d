import errno
import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from forked_ranks import Ranks, run_ranks
from rs_transfer.cli import main
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


RECORD = pseudo_label.record_dtype(2)  # what _run writes: topk=2 of 3 classes


def _records(out, rank=0, world=1) -> np.ndarray:
    return np.fromfile(pseudo_label.shard_path(out, rank, world), RECORD)


def _teacher_probs(teacher, item) -> torch.Tensor:
    """The teacher's probabilities for one image, computed here independently of label_images."""
    from rs_transfer.models.normalize import Normalize

    model = pseudo_label.load_teacher(str(teacher), "rs26-w0.25")
    image = transforms.eval_transform(32)(data.decode(data.read_bytes(item.where)))
    with torch.no_grad():
        return model(Normalize()(image[None])).softmax(dim=1)[0]


def _same_files(a, b, names=("labels/index.npy", "labels/label.npy", "labels/confidence.npy",
                             "labels/topk_class.npy", "labels/topk_prob.npy", "selected.npy", "meta.json")):
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_pseudo_label_round_trip_on_shards_and_resume_after_interruption(teacher, unlabelled, tmp_path):
    full = _run(teacher, unlabelled, tmp_path / "full")
    assert (full["labelled"], full["samples"], full["selected"], full["unreadable"]) == (22, 22, 22, 0)
    assert (full["num_classes"], full["k"], full["bytes_per_row"]) == (NUM_CLASSES, 2, 32)
    assert full["images"] == str(unlabelled.resolve()) and full["format"] == pseudo_label.FORMAT
    meta, table, selected = pseudo_label.read_selection(tmp_path / "full")
    assert meta == full and isinstance(table["label"], np.memmap) and isinstance(selected, np.memmap)
    assert table["index"].tolist() == list(range(22)) and selected.tolist() == list(range(22))
    assert table["topk_class"].shape == table["topk_prob"].shape == (22, 2)
    assert table["topk_class"][:, 0].tolist() == table["label"].tolist()
    assert table["topk_prob"][:, 0].tolist() == table["confidence"].tolist()
    assert (table["topk_prob"][:, 0] >= table["topk_prob"][:, 1]).all()
    assert (table["topk_class"][:, 0] != table["topk_class"][:, 1]).all()
    images = data.list_images(unlabelled)
    for row in (0, 9, 21):  # row i is image i of the image set, whichever shard it is in
        probs = _teacher_probs(teacher, images[int(table["index"][row])])
        assert int(table["label"][row]) == int(probs.argmax())
        assert float(table["confidence"][row]) == pytest.approx(float(probs.max()), abs=1e-5)
    assert len(set(table["label"].tolist())) > 1  # a teacher that labels everything alike would test nothing

    # Interrupted: two batches written, then a kill in the middle of a record.
    out = tmp_path / "resumed"
    assert _run(teacher, unlabelled, out, max_batches=2) == {}
    shard = pseudo_label.shard_path(out, 0, 1)
    assert shard.stat().st_size == 8 * RECORD.itemsize and not (out / "meta.json").exists()
    assert _records(out).tobytes() == _records(tmp_path / "full")[:8].tobytes()
    with shard.open("ab") as file:
        file.write(_records(tmp_path / "full")[8:9].tobytes()[:13])
    resumed = _run(teacher, unlabelled, out)
    assert resumed == full
    assert shard.read_bytes() == pseudo_label.shard_path(tmp_path / "full", 0, 1).read_bytes()
    _same_files(out, tmp_path / "full")


def test_two_ranks_label_contiguous_ranges_and_rank_0_joins_them_like_one_process(teacher, unlabelled, tmp_path,
                                                                                 monkeypatch):
    one = _run(teacher, unlabelled, tmp_path / "one", threshold=0.36, per_class=5)
    out = tmp_path / "two"
    monkeypatch.setattr(pseudo_label.distributed, "barrier", lambda: None)
    for rank in (1, 0):  # rank 1 first: rank 0 finishes the table only once both files are complete
        info = pseudo_label.distributed.DistInfo(rank, 2, 0, torch.device("cpu"))
        monkeypatch.setattr(pseudo_label.distributed, "init_distributed", lambda device, info=info: info)
        meta = _run(teacher, unlabelled, out, threshold=0.36, per_class=5)
        assert meta == ({} if rank == 1 else {**one, "world_size": 2})
    assert _records(out, 1, 2)["index"].tolist() == list(range(11, 22))
    _same_files(out, tmp_path / "one", names=("labels/index.npy", "labels/label.npy", "labels/topk_class.npy",
                                              "selected.npy"))
    table = pseudo_label.open_table(out / "labels")
    np.testing.assert_allclose(table["topk_prob"], pseudo_label.open_table(tmp_path / "one" / "labels")["topk_prob"],
                               atol=1e-6)


def test_pseudo_label_on_a_folder_skips_unreadable_images_and_co_trains_on_the_rest(teacher, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    make_image(0, NUM_CLASSES, (40, 40), rng).save(folder / "a.png")
    (folder / "b.jpg").write_bytes(b"\xff\xd8 broken")
    make_image(1, NUM_CLASSES, (44, 40), rng).save(folder / "c.png")
    meta = _run(teacher, folder, tmp_path / "out")
    assert (meta["labelled"], meta["unreadable"], meta["selected"]) == (3, 1, 2)
    _, table, selected = pseudo_label.read_selection(tmp_path / "out")
    assert table["label"][1] == -1 and table["confidence"][1] == 0.0
    assert table["topk_class"][1].tolist() == [-1, -1] and table["topk_prob"][1].tolist() == [0.0, 0.0]
    assert selected.tolist() == [0, 2]

    pseudo = cotrain.load_pseudo_set(tmp_path / "out", transforms.eval_transform(16), NUM_CLASSES, "hard", 0.1)
    assert len(pseudo) == 2 and [pseudo.items[i].ref for i in range(2)] == ["a.png", "c.png"]
    image, target = pseudo[1]
    assert image.shape == (3, 16, 16) and int(target.argmax()) == int(table["label"][2])
    assert target.max().item() == pytest.approx(0.9 + 0.1 / NUM_CLASSES) and target.sum().item() == pytest.approx(1)

    make_image(2, NUM_CLASSES, (40, 40), rng).save(folder / "d.png")  # the image set changed since labelling
    with pytest.raises(UserError, match=r"are of 3 images, .*images now holds 4: the image set changed"):
        cotrain.load_pseudo_set(tmp_path / "out", transforms.eval_transform(16), NUM_CLASSES)
    with pytest.raises(UserError, match="have 3 classes, the model 5"):
        cotrain.load_pseudo_set(tmp_path / "out", transforms.eval_transform(16), 5)


def test_topk_is_capped_at_the_class_count_and_zero_keeps_the_label_alone(teacher, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    make_image(0, NUM_CLASSES, (40, 40), np.random.default_rng(0)).save(folder / "a.png")
    all_classes = _run(teacher, folder, tmp_path / "k5", topk=5)
    _, table, _ = pseudo_label.read_selection(tmp_path / "k5")
    assert (all_classes["topk"], all_classes["k"], all_classes["bytes_per_row"]) == (5, NUM_CLASSES, 40)
    assert sorted(table["topk_class"][0].tolist()) == [0, 1, 2]
    assert float(table["topk_prob"][0].sum()) == pytest.approx(1, abs=1e-6)
    assert _run(teacher, folder, tmp_path / "k0", topk=0)["bytes_per_row"] == 16
    _, table, _ = pseudo_label.read_selection(tmp_path / "k0")
    assert table["topk_class"].shape == (1, 0)
    pseudo = cotrain.load_pseudo_set(tmp_path / "k0", transforms.eval_transform(16), NUM_CLASSES, "soft", 0.0)
    assert pseudo[0][1].tolist() == [float(c == int(table["label"][0])) for c in range(NUM_CLASSES)]


def test_a_rerun_with_another_world_size_topk_or_image_set_is_refused(teacher, unlabelled, tmp_path):
    out = tmp_path / "out"
    assert _run(teacher, unlabelled, out, max_batches=1) == {}
    written = pseudo_label.shard_path(out, 0, 1).read_bytes()
    header = json.loads(pseudo_label.header_path(out, 0, 1).read_text())
    assert (header["topk"], header["k"], header["samples"], header["bytes_per_record"]) == (2, 2, 22, 32)
    assert np.lib.format.descr_to_dtype([tuple(f) for f in header["dtype"]]) == RECORD
    with pytest.raises(UserError, match=r"written with --topk 2, this run asks for --topk 3; rerun with --topk 2"):
        _run(teacher, unlabelled, out, topk=3)
    other = write_shards(tmp_path / "other", [("x", make_image(0, NUM_CLASSES, (32, 32), np.random.default_rng(0)),
                                                -1)], labelled=False)[0].parent
    with pytest.raises(UserError, match=r"are of 22 images in .*unlabelled.*, this run has 1 images in .*other"):
        _run(teacher, other, out)
    (out / "rank00001-of-00002.bin").write_bytes(b"")
    with pytest.raises(UserError, match="another number of ranks"):
        _run(teacher, unlabelled, out)
    assert pseudo_label.shard_path(out, 0, 1).read_bytes() == written


def _table(label, confidence, k=1) -> dict:
    n = len(label)
    return {"index": np.arange(n), "label": np.array(label, dtype=np.int32),
            "confidence": np.array(confidence, dtype=np.float32), "topk_class": np.zeros((n, k), np.int32),
            "topk_prob": np.zeros((n, k), np.float32)}


def test_selection_filters_by_confidence_balances_classes_breaks_ties_by_index_and_sorts_by_index(tmp_path):
    #         row:  0    1    2    3    4    5    6    7
    label = [0, 0, 0, 1, 1, 2, -1, 0]
    confidence = [0.9, 0.5, 0.7, 0.8, 0.2, 0.1, 0.0, 0.7]
    table = pseudo_label.open_table(pseudo_label.write_table(tmp_path / "t", **_table(label, confidence)))
    select = pseudo_label.select
    assert select(table, 0.3, 0).tolist() == [0, 1, 2, 3, 7]
    assert select(table, 0.7, 0).tolist() == [0, 2, 3, 7]  # 0.7 itself reaches 0.7 (both float32)
    assert select(table, 0.0, 0).tolist() == [0, 1, 2, 3, 4, 5, 7]  # never the unreadable row 6
    # Class 0 by confidence: 0 (0.9), 2 and 7 (0.7, tie: lower index first), 1 (0.5); class 1: 3 alone.
    assert select(table, 0.3, 2).tolist() == [0, 2, 3, 3]
    assert select(table, 0.3, 3).tolist() == [0, 2, 3, 3, 3, 7]
    assert select(table, 0.3, 6).tolist() == [0, 0, 1, 2, 2, 3, 3, 3, 3, 3, 3, 7]  # 0, 2, 7, 1, 0, 2 of class 0
    assert select(table, 0.0, 1).tolist() == [0, 3, 5]
    empty = select(table, 0.95, 2)
    assert empty.dtype == np.int64 and empty.tolist() == []
    assert select(table, 0.3, 3).dtype == select(table, 0.3, 0).dtype == np.int64


def test_table_writer_takes_chunks_and_replaces_nothing_when_short_or_out_of_order(tmp_path):
    columns = _table([2, -1, 0, 1, 1], [0.5, 0.0, 0.25, 1.0, 0.75], k=2)
    columns["index"] = np.array([3, 4, 8, 9, 20])
    columns["topk_class"][:] = [[2, 1], [-1, -1], [0, 2], [1, 0], [1, 2]]
    whole = pseudo_label.write_table(tmp_path / "whole", **columns)
    with pseudo_label.TableWriter(tmp_path / "chunks", 5, 2) as writer:
        for part in (slice(0, 2), slice(2, 2), slice(2, 5)):
            writer.append(**{name: column[part] for name, column in columns.items()})
    for name, column in columns.items():
        loaded = np.load(tmp_path / "chunks" / f"{name}.npy", allow_pickle=False)
        assert loaded.dtype == np.dtype(pseudo_label.COLUMNS[name]) and loaded.tolist() == column.tolist()
        assert (whole / f"{name}.npy").read_bytes() == (tmp_path / "chunks" / f"{name}.npy").read_bytes()

    with pytest.raises(ValueError, match="3 rows written, 5 expected"):
        with pseudo_label.TableWriter(tmp_path / "chunks", 5, 2) as writer:
            writer.append(**{**{name: column[:3] for name, column in columns.items()}, "label": np.full(3, 7)})
    with pytest.raises(ValueError, match="ascending index order"):
        with pseudo_label.TableWriter(tmp_path / "chunks", 5, 2) as writer:
            writer.append(**{name: column[[0, 2, 1, 3, 4]] for name, column in columns.items()})
    assert pseudo_label.open_table(tmp_path / "chunks")["label"].tolist() == [2, -1, 0, 1, 1]  # untouched
    assert sorted(p.name for p in (tmp_path / "chunks").iterdir()) == sorted(f"{n}.npy" for n in columns)
    (tmp_path / "chunks" / "label.npy").unlink()
    with pytest.raises(UserError, match=r"cannot read the pseudo-label column .*label\.npy"):
        pseudo_label.open_table(tmp_path / "chunks")


def test_unfinished_or_old_format_folders_are_refused_by_co_training(tmp_path):
    with pytest.raises(UserError, match="holds no finished pseudo-labels"):
        pseudo_label.read_selection(tmp_path)
    (tmp_path / "meta.json").write_text(json.dumps({"images": "x", "num_classes": 3}))
    with pytest.raises(UserError, match="older format"):
        cotrain.load_pseudo_set(tmp_path, transforms.eval_transform(16), 3)


def _pseudo_dataset(tmp_path, teacher, unlabelled, targets="soft", label_smoothing=0.0):
    _run(teacher, unlabelled, tmp_path / "pl", topk=2, threshold=0.36)
    return cotrain.load_pseudo_set(tmp_path / "pl", transforms.eval_transform(16), NUM_CLASSES, targets,
                                   label_smoothing)


def test_batches_mix_labelled_and_pseudo_at_the_data_ratio(teacher, unlabelled, tmp_path):
    pseudo = _pseudo_dataset(tmp_path, teacher, unlabelled)
    _, table, selected = pseudo_label.read_selection(tmp_path / "pl")
    assert 0 < len(pseudo) == len(selected) < 22  # the threshold dropped some
    images = data.list_images(unlabelled)
    assert [pseudo.items[i].ref for i in range(len(pseudo))] == [images[int(r)].ref for r in selected]
    assert pseudo.items.locality == max(1, int(images.locality * len(selected) / 22))
    items = [data.Item(f"l{i}", i % NUM_CLASSES, unlabelled_item.where)
             for i, unlabelled_item in enumerate(images[i] for i in range(6))]
    labelled = data.ImageDataset(items, transforms.eval_transform(16))
    for ratio, batch_size, expected in ((1.0, 8, 4), (3.0, 8, 6), (0.5, 9, 3), (3.0, 6, 4)):
        collate = cotrain.MixedCollate(labelled, pseudo, ratio, NUM_CLASSES, 0.1)
        batch = collate(list(range(batch_size)))
        assert set(batch) == {"image", "target", "num_pseudo"}
        assert int(batch["num_pseudo"]) == expected == cotrain.pseudo_count(batch_size, ratio)
        assert batch["image"].shape == (batch_size, 3, 16, 16) and batch["image"].dtype == torch.uint8
        targets = batch["target"]
        assert torch.allclose(targets.sum(dim=1), torch.ones(batch_size))
        n_labelled = batch_size - expected
        for row, slot in zip(targets[:n_labelled], range(n_labelled)):  # one-hot with smoothing 0.1
            assert row.max().item() == pytest.approx(0.9 + 0.1 / NUM_CLASSES)
            assert row.argmax().item() == items[slot % 6].label
        for row, slot in zip(targets[n_labelled:], range(n_labelled, batch_size)):  # the teacher's top-2, renormalised
            table_row = int(selected[slot % len(pseudo)])
            (c1, c2), (p1, p2) = table["topk_class"][table_row], table["topk_prob"][table_row]
            assert row[c1].item() == pytest.approx(p1 / (p1 + p2), abs=1e-6)
            assert row[c2].item() == pytest.approx(p2 / (p1 + p2), abs=1e-6)
            assert (row > 0).sum() == 2
    hard = _pseudo_dataset(tmp_path, teacher, unlabelled, "hard", 0.0)
    batch = cotrain.MixedCollate(labelled, hard, 1.0, NUM_CLASSES, 0.0)(list(range(4)))
    assert set(batch["target"].flatten().tolist()) == {0.0, 1.0}
    assert batch["target"][2:].argmax(1).tolist() == [int(table["label"][selected[i]]) for i in (2, 3)]
    assert cotrain.SlotDataset(10)[7] == 7 and len(cotrain.SlotDataset(10)) == 10
    with pytest.raises(UserError, match="cotrain.targets must be 'soft' or 'hard'"):
        _pseudo_dataset(tmp_path, teacher, unlabelled, "sharp")


def test_skipped_reads_are_the_train_sets_or_both_co_training_sets(tmp_path):
    from rs_transfer.engine.task import Task
    from rs_transfer.pretrain.task import skipped_reads

    make_image(0, NUM_CLASSES, (20, 20), np.random.default_rng(0)).save(tmp_path / "good.png")
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 broken")
    items = [data.Item("bad.jpg", 0, str(tmp_path / "bad.jpg")), data.Item("good.png", 0, str(tmp_path / "good.png"))]
    labelled, pseudo = data.ImageDataset(items), data.ImageDataset(items)
    labelled[0]
    pseudo[0], pseudo[0]  # the good image stands in for the bad one, and each read of it counts
    plain = Task(model=torch.nn.Identity(), train_set=labelled, evaluate=None, primary_metric="top1",
                 collate_fn=data.collate)
    assert skipped_reads(plain) == labelled.skipped == 1
    collate = cotrain.MixedCollate(labelled, pseudo, 1.0, NUM_CLASSES, 0.0)
    mixed = Task(model=torch.nn.Identity(), train_set=cotrain.SlotDataset(4), evaluate=None, primary_metric="top1",
                 collate_fn=collate)
    assert skipped_reads(mixed) == collate.skipped == 3


def test_the_pseudo_set_pickles_without_its_columns(teacher, unlabelled, tmp_path):
    import pickle

    pseudo = _pseudo_dataset(tmp_path, teacher, unlabelled)
    _, target = pseudo[0]  # opens the memory maps in this process
    assert pseudo.items._columns is not None
    # What a spawned DataLoader worker receives besides the shared skip counter (which only spawning may pickle).
    pickled = pickle.dumps((pseudo.items, pseudo.targets))
    items, targets = pickle.loads(pickled)
    assert items._columns is None and targets.labels is items and len(pickled) < 20000
    assert items[0].ref == pseudo.items[0].ref and torch.equal(targets[0], target)


@pytest.mark.slow  # a CLI process, killed with SIGKILL while it writes
def test_pseudo_label_resumes_after_sigkill(teacher, tmp_path):
    out = tmp_path / "killed"
    images, process = _label_in_a_subprocess(teacher, tmp_path, out, seed=1, records=5)
    shard = pseudo_label.shard_path(out, 0, 1)
    process.signal(signal.SIGKILL)
    assert process.wait().returncode == -signal.SIGKILL
    written = shard.stat().st_size // RECORD.itemsize
    assert 5 <= written < 80 and not (out / "meta.json").exists() and not (out / "selected.npy").exists()
    meta = _run(teacher, images, out, batch_size=1)
    assert (meta["labelled"], meta["selected"]) == (80, 80)
    full = _run(teacher, images, tmp_path / "full", batch_size=1)
    assert meta == full
    assert shard.read_bytes() == pseudo_label.shard_path(tmp_path / "full", 0, 1).read_bytes()
    _same_files(out, tmp_path / "full")


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


def test_full_disk_while_labelling_keeps_the_records_before_and_a_rerun_finishes(teacher, unlabelled, tmp_path,
                                                                               monkeypatch):
    full = _run(teacher, unlabelled, tmp_path / "full")
    out = tmp_path / "filled"
    shard = pseudo_label.shard_path(out, 0, 1)
    real_fsync = os.fsync
    batches = []

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}") == str(shard):
            batches.append(fd)
            if len(batches) == 3:  # the third batch: the disk is full
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(FileWriteError, match=rf"^cannot write pseudo-label shard {shard}: No space left on device; "
                                             r"the 8 labels written before are kept, rerun to continue$"):
        _run(teacher, unlabelled, out)
    monkeypatch.undo()
    assert shard.read_bytes()[:8 * RECORD.itemsize] == _records(tmp_path / "full")[:8].tobytes()
    assert _run(teacher, unlabelled, out) == full
    _same_files(out, tmp_path / "full")


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
        with pytest.raises(StoppedBySignal, match=r"^SIGUSR1 after 8 of 22 images on rank 0; rerun the "
                                                  r"same command to continue$") as stopped:
            _run(teacher, unlabelled, tmp_path / "out")
        assert stopped.value.exit_code == 128 + signal.SIGUSR1
        os.kill(os.getpid(), signal.SIGUSR1)
        assert received == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert _records(tmp_path / "out")["index"].tolist() == list(range(8))
    assert not (tmp_path / "out" / "meta.json").exists()


@pytest.mark.slow  # two CLI processes
def test_sigterm_to_the_cli_stops_with_143_and_a_rerun_finishes(teacher, tmp_path):
    out = tmp_path / "stopped"
    images, process = _label_in_a_subprocess(teacher, tmp_path, out, seed=2, records=1)
    shard = pseudo_label.shard_path(out, 0, 1)
    process.signal(signal.SIGTERM)  # as SLURM does: the whole process group
    stopped = process.wait(timeout=240)
    stderr = stopped.stderr
    assert stopped.returncode == 143, stderr
    assert shard.stat().st_size % RECORD.itemsize == 0  # the batch in flight was finished, not torn
    written = len(_records(out))
    assert _records(out)["index"].tolist() == list(range(written))
    assert stderr.strip().splitlines()[-1] == (f"stopped: SIGTERM after {written} of 80 images on rank 0; "
                                               "rerun the same command to continue")
    assert written < 80 and not (out / "meta.json").exists()
    rerun = run_ranks(main, _cli_command(teacher, images, out), world_size=1, timeout=240)
    assert rerun.returncode == 0, rerun.stderr
    assert _run(teacher, images, tmp_path / "full", batch_size=1)["labelled"] == 80
    _same_files(out, tmp_path / "full")


def _cli_command(teacher, images, out) -> list:
    return ["pseudo-label", "--teacher", str(teacher), "--images", str(images),
            "--out", str(out), "--model", "rs26-w0.25", "--image-size", "32", "--batch-size", "1", "--topk", "2",
            "--threshold", "0", "--num-workers", "0"]


def _label_in_a_subprocess(teacher, tmp_path, out, seed: int, records: int) -> tuple:
    """(image folder, process): 80 generated images in two shards, labelled by the CLI in a process forked from this
    one (forked_ranks.Ranks, world size 1; batch 1) that has written at least `records` records to OUT's rank file
    when this returns."""
    rng = np.random.default_rng(seed)
    samples = [(f"s{seed}_{i:03d}", make_image(i % NUM_CLASSES, NUM_CLASSES, (36, 36), rng), -1) for i in range(80)]
    images = write_shards(tmp_path / "images", samples, per_shard=40, labelled=False)[0].parent
    shard = pseudo_label.shard_path(out, 0, 1)
    process = Ranks(main, _cli_command(teacher, images, out), world_size=1)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not (shard.exists() and shard.stat().st_size >= records * RECORD.itemsize):
        time.sleep(0.01)
    return images, process


def test_nonsense_settings_are_refused_before_a_finished_result_is_touched(teacher, unlabelled, tmp_path):
    out = tmp_path / "pl"
    _run(teacher, unlabelled, out)
    meta = (out / "meta.json").read_text()
    for option, value, message in (("threshold", float("nan"), r"--threshold must be a probability in \[0, 1\], "
                                    r"got nan"), ("threshold", 2.0, "--threshold"),
                                   ("per_class", -2, "--per-class must be at least 0"),
                                   ("batch_size", 0, "--batch-size must be at least 1")):
        with pytest.raises(UserError, match=message):
            _run(teacher, unlabelled, out, **{option: value})
    assert (out / "meta.json").read_text() == meta  # the finished result is still there


def test_co_training_refuses_labels_of_an_image_set_swapped_for_one_of_the_same_size(teacher, tmp_path):
    rng = np.random.default_rng(1)
    first = [(f"a{i:02d}", make_image(i % NUM_CLASSES, NUM_CLASSES, (32, 32), rng), -1) for i in range(8)]
    images = write_shards(tmp_path / "images", first, per_shard=4, labelled=False)[0].parent
    _run(teacher, images, tmp_path / "pl")
    assert len(cotrain.load_pseudo_set(tmp_path / "pl", transforms.eval_transform(16), NUM_CLASSES)) == 8
    other = [(f"b{i:02d}", make_image(i % NUM_CLASSES, NUM_CLASSES, (32, 32), rng), -1) for i in range(4)]
    write_shards(tmp_path / "other", other, per_shard=4, labelled=False)
    (tmp_path / "other" / "shard-00000.tar").replace(images / "shard-00001.tar")  # same count, other images
    with pytest.raises(UserError, match=r"are of other images than .* now holds \(shard names, sizes or image names"):
        cotrain.load_pseudo_set(tmp_path / "pl", transforms.eval_transform(16), NUM_CLASSES)


def test_one_pseudo_labelling_job_per_out_folder_at_a_time(teacher, unlabelled, tmp_path):
    from engine_toy import folder_held
    from rs_transfer.files import FolderInUseError

    with folder_held(tmp_path / "out") as pid:
        with pytest.raises(FolderInUseError, match=rf"--out {tmp_path / 'out'} is in use .*pid {pid}"):
            _run(teacher, unlabelled, tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == [".lock"]  # nothing labelled, nothing removed
    assert _run(teacher, unlabelled, tmp_path / "out")["samples"] == 22


def test_any_timm_classifier_can_teach(unlabelled, tmp_path):
    # Table 4's teacher is EfficientNet-L2 (timm's tf_efficientnet_l2): a timm classifier whose head is `classifier`,
    # not a zoo ResNet's `fc`; a small one of the same kind stands in for it here
    import timm

    torch.manual_seed(0)
    net = timm.create_model("mobilenetv3_small_050", num_classes=NUM_CLASSES)
    path = tmp_path / "timm_teacher.pth"
    torch.save(net.state_dict(), path)
    meta = _run(path, unlabelled, tmp_path / "out", model_name="mobilenetv3_small_050")
    assert meta["num_classes"] == NUM_CLASSES and meta["labelled"] == 22
    with pytest.raises(UserError, match="neither a zoo name .* nor a timm model"):
        _run(path, unlabelled, tmp_path / "other", model_name="no_such_net")


def test_a_run_folder_as_teacher_gives_model_and_resolution_and_a_wrong_model_is_named(teacher, tmp_path):
    import yaml

    run = tmp_path / "teacher_run"
    run.mkdir()
    config = {"model": {"name": "rs26-w0.25"}, "data": {"image_size": 160, "eval_image_size": 192}, "augment": {}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(UserError, match=r"has no weights\.pth .*resume it"):
        pseudo_label.teacher_from_run(str(run), None, None)
    (run / "weights.pth").write_bytes(teacher.read_bytes())
    weights = str(run / "weights.pth")
    assert pseudo_label.teacher_from_run(str(run), None, None) == (weights, "rs26-w0.25", 192)
    assert pseudo_label.teacher_from_run(weights, None, 64) == (weights, "rs26-w0.25", 64)
    with pytest.raises(UserError, match=r"--model rs152, but the teacher run .* is a rs26-w0\.25"):
        pseudo_label.teacher_from_run(str(run), "rs152", None)
    # a file without a run beside it keeps the documented defaults
    assert pseudo_label.teacher_from_run(str(teacher), None, None) == (str(teacher), "rs152", 224)
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"name": "rs26-w0.25"}, "task": {"name": "pascal_seg"}}))
    with pytest.raises(UserError, match=r"a teacher is a classifier, and .* is a pascal_seg run"):
        pseudo_label.teacher_from_run(str(run), None, None)
    # the wrong architecture: the hint comes before the long list of keys
    with pytest.raises(UserError, match=r"does not fit model 'rs50' \(give --model the teacher's architecture, or "
                                        r"--teacher its run folder\): \d+ missing keys"):
        pseudo_label.load_teacher(str(teacher), "rs50")
