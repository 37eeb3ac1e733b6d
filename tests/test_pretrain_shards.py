"""Tar shards at scale: a per-shard descriptor (index.json, wids' format), samples read on demand, whole shards
held out for minival, an epoch order that keeps to a few shards, and training that resumes exactly."""

import io
import json
import resource
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from engine_toy import CONFIGS, killed_and_resumed_ends_where_it_would_have, script_env
from rs_transfer.cli import main
from rs_transfer.pretrain import data, shards, transforms
from rs_transfer.pretrain.synthetic import make_image, make_shard_dataset, write_shards

DEMO = CONFIGS / "pretrain" / "demo.yaml"
TRAIN = ["model.name=rs26-w0.25", "data.image_size=32", "train.batch_size=16", "train.log_every_steps=2",
         "train.eval_every_epochs=0", "data.eval_split=minival", "data.minival_fraction=0.2"]


def jpeg_bytes(label: int = 0) -> bytes:
    buffer = io.BytesIO()
    make_image(label, 4, (20, 20), np.random.default_rng(label)).save(buffer, format="JPEG")
    return buffer.getvalue()


def write_tar(path: Path, members: list, tar_format=tarfile.USTAR_FORMAT) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tar_format) as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


@pytest.fixture(scope="module")
def shard_root(tmp_path_factory) -> Path:
    # 4 classes x 20 images in shards of 8: 10 train shards, minival 0.2 holds out 2 of them
    return make_shard_dataset(tmp_path_factory.mktemp("shards"), num_classes=4, train_per_class=20,
                              val_per_class=2, per_shard=8)


def test_index_writes_wids_descriptor_and_start_up_then_opens_no_shard(shard_root, tmp_path, monkeypatch, capsys):
    root = tmp_path / "copy"
    make_shard_dataset(root, num_classes=4, train_per_class=20, val_per_class=2, per_shard=8)
    assert main(["index", str(root / "train"), "--workers", "2"]) == 0
    index = json.loads((root / "train" / "index.json").read_text())
    assert [e["url"] for e in index["shardlist"]] == [f"shard-{s:05d}.tar" for s in range(10)]
    assert [e["nsamples"] for e in index["shardlist"]] == [8] * 10
    assert index["shardlist"][0]["filesize"] == (root / "train" / "shard-00000.tar").stat().st_size
    assert index["rs_transfer"]["labelled"] and index["rs_transfer"]["label_counts"] == [20, 20, 20, 20]

    def no_shard(path):
        raise AssertionError(f"start-up opened {path}")

    monkeypatch.setattr(shards, "open_shard", no_shard)
    images, classes = data.load_split(root, "train", num_classes=None)
    assert len(images) == 80 and classes is None and images.num_shards == 10
    assert data.infer_num_classes(images, classes, root / "train") == 4
    with pytest.raises(data.DataError, match=r"labels up to 3, outside model.num_classes=3"):
        data.load_split(root, "train", num_classes=3)


def test_samples_read_through_the_index_are_those_of_the_scan(shard_root):
    scanned = data.scan_shards(sorted((shard_root / "train").glob("*.tar")))
    indexed = shards.ShardImages(shard_root / "train", shards.describe(shard_root / "train"))
    assert [(s.ref, s.label, s.where) for s in indexed] == [(s.ref, s.label, s.where) for s in scanned]
    assert indexed[9].ref == "shard-00001.tar/train_000_00009" and indexed[9].label == 0
    assert indexed[79].label == 3 and indexed.locate(79) == (9, 7)
    image = data.decode(data.read_bytes(indexed[41].where))
    assert image.mode == "RGB" and min(image.size) >= 40


def test_a_stale_index_is_an_error_naming_the_shard_and_the_fix(tmp_path):
    folder = tmp_path / "train"
    write_shards(folder, [(f"k{i}", make_image(i % 2, 2, (16, 16), np.random.default_rng(i)), i % 2)
                          for i in range(8)], per_shard=4)
    shards.write_index(folder)
    images = shards.open_split(folder)
    write_tar(folder / "shard-00001.tar", [("k4.jpg", jpeg_bytes()), ("k4.cls", b"0")])  # rewritten: 1 sample
    assert images[3].label == 1
    with pytest.raises(data.DataError, match=r"shard-00001.tar holds 1 samples but .*index.json says 4: the shards "
                                             r"changed; rerun `rs-transfer index"):
        images[4]  # during a run: when the shard is first opened
    with pytest.raises(data.DataError, match=r"shard-00001.tar has \d+ bytes but .*index.json says \d+: the shards "
                                             r"changed; rerun `rs-transfer index"):
        shards.open_split(folder)  # at start-up: sizes are checked
    (folder / "shard-00001.tar").unlink()
    with pytest.raises(data.DataError, match=r"shard-00001.tar, listed in .*index.json, cannot be read"):
        data.load_split(tmp_path, "train", num_classes=2)


def test_members_behind_headers_wids_does_not_parse_are_read_through_tarfile(tmp_path):
    long_key = "d" * 60 + "/" + "k" * 60  # 125 characters: tarfile writes a PAX header, wids would cut the name
    write_tar(tmp_path / "pax.tar", [(f"{long_key}.jpg", jpeg_bytes(1)), (f"{long_key}.cls", b"1"),
                                     ("short.jpg", jpeg_bytes(2)), ("short.cls", b"2")], tar_format=tarfile.PAX_FORMAT)
    samples = data.scan_shards([tmp_path / "pax.tar"])
    assert [(s.ref, s.label) for s in samples] == [(f"pax.tar/{long_key}", 1), ("pax.tar/short", 2)]
    assert data.read_bytes(samples[0].where) == jpeg_bytes(1) and data.read_bytes(samples[1].where) == jpeg_bytes(2)
    with tarfile.open(tmp_path / "dirs.tar", "w", format=tarfile.USTAR_FORMAT) as tar:  # a folder entry first
        folder = tarfile.TarInfo("a")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for name, payload in (("a/k.jpg", jpeg_bytes()), ("a/k.cls", b"1")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    samples = data.scan_shards([tmp_path / "dirs.tar"])
    assert [(s.ref, s.label) for s in samples] == [("dirs.tar/a/k", 1)]
    assert data.read_bytes(samples[0].where) == jpeg_bytes()


def test_minival_holds_out_whole_shards_twenty_of_1024(tmp_path):
    from rs_transfer.bench.index import write_descriptor

    write_descriptor(tmp_path / "train", samples=1024 * 50, shards=1024)
    images = shards.open_split(tmp_path / "train")
    train, minival = data.minival_split(images, 0.02, seed=0)
    assert minival.num_shards == 20 and train.num_shards == 1004
    assert len(minival) == 20 * 50 and len(train) + len(minival) == len(images)
    assert not set(train.shard_numbers) & set(minival.shard_numbers)
    again = data.minival_split(shards.open_split(tmp_path / "train"), 0.02, seed=0)[1]
    assert again.shard_numbers == minival.shard_numbers
    assert data.minival_split(images, 0.02, seed=1)[1].shard_numbers != minival.shard_numbers


def test_130m_samples_over_13000_shards_hold_no_object_per_sample(tmp_path):
    from rs_transfer.bench.index import write_descriptor

    write_descriptor(tmp_path / "train", samples=130_000_000, shards=13_000)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    images = shards.open_split(tmp_path / "train")
    train, minival = data.minival_split(images, 0.02, seed=0)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert len(images) == 130_000_000 and minival.num_shards == 260
    assert images.locate(129_999_999) == (12_999, 9_999) and images.locate(10_000) == (1, 0)
    assert grown_mb < 64
    assert images.locality == 8 * 10_000


def test_a_training_set_of_shards_asks_for_a_blocked_order(shard_root):
    from rs_transfer.engine.sampling import RunSampler

    images, _ = data.load_split(shard_root, "train", num_classes=4)
    dataset = data.ImageDataset(images, transforms.eval_transform(16))
    assert dataset.locality == 64  # 8 shards of 8 samples
    sampler = RunSampler(dataset, num_replicas=1, rank=0, seed=0)
    sampler.start, sampler.count = (0, 0), 64
    order = [index for _, index in sampler]
    assert sorted(order) == list(range(64))  # the first block: shards 0-7 only, shuffled


def test_a_corrupt_member_is_skipped_counted_and_named(tmp_path, caplog):
    folder = tmp_path / "data" / "train"
    members = []
    for i in range(8):
        payload = jpeg_bytes(i % 2) if i != 3 else b"\xff\xd8\xff\xe0 truncated"
        members += [(f"k{i}.jpg", payload), (f"k{i}.cls", str(i % 2).encode())]
    write_tar(folder / "shard-00000.tar", members)
    images, _ = data.load_split(tmp_path / "data", "train", num_classes=2)
    dataset = data.ImageDataset(images, transforms.eval_transform(16))
    loaded = [dataset[i] for i in range(len(dataset))]
    assert [label for _, label in loaded] == [0, 1, 0, 0, 0, 1, 0, 1]  # k4 stands in for k3
    assert dataset.skipped == 1
    assert any("shard-00000.tar/k3" in r.getMessage() for r in caplog.records)


@pytest.fixture(scope="module")
def pseudo_labels(shard_root, tmp_path_factory) -> Path:
    """Pseudo-labels of the 8 validation images (one shard), by an untrained teacher: all selected."""
    from rs_transfer.models import create_model
    from rs_transfer.pretrain.pseudo_label import label_images

    folder = tmp_path_factory.mktemp("pseudo")
    torch.save(create_model("rs26-w0.25", num_classes=4).state_dict(), folder / "teacher.pth")
    label_images(str(folder / "teacher.pth"), str(shard_root / "val"), str(folder / "out"), model_name="rs26-w0.25",
                 image_size=32, batch_size=4, topk=2, threshold=0.0, num_workers=0)
    return folder / "out"


def _cotrain(enabled: bool, pseudo: Path) -> list:
    return ["cotrain.enabled=true", f"cotrain.pseudo_labels={pseudo}", "cotrain.data_ratio=1"] if enabled else []


@pytest.mark.slow  # three CLI runs (forked from this process: forked_ranks.py)
@pytest.mark.parametrize("cotrain", [False, True], ids=["supervised", "cotrain"])
def test_pretraining_on_indexed_shards_killed_and_resumed_ends_bitwise_where_it_would_have(shard_root, tmp_path,
                                                                                          cotrain, pseudo_labels):
    shards.write_index(shard_root / "train")
    try:
        args = ["pretrain", "--config", str(DEMO), *TRAIN, "data.num_workers=2", "train.epochs=4",
                "train.checkpoint_every_steps=2", f"data.root={shard_root}", *_cotrain(cotrain, pseudo_labels)]
        killed_and_resumed_ends_where_it_would_have(args, tmp_path, {}, ranks=1)
    finally:
        (shard_root / "train" / "index.json").unlink()


@pytest.mark.slow  # three 2-rank runs (forked from this process: forked_ranks.py)
@pytest.mark.parametrize("cotrain", [True], ids=["cotrain"])  # its batches mix the labelled shards with the pseudo
# ones, so the supervised reading is in it too; the one-process test above runs both (the suite's time budget)
def test_two_gloo_ranks_on_shards_killed_and_resumed_end_bitwise_where_they_would_have(shard_root, tmp_path, cotrain,
                                                                                      pseudo_labels):
    args = ["pretrain", "--config", str(DEMO), *TRAIN, "train.batch_size=8", "data.num_workers=1", "train.epochs=3",
            "train.checkpoint_every_steps=2", f"data.root={shard_root}", *_cotrain(cotrain, pseudo_labels)]
    killed_and_resumed_ends_where_it_would_have(args, tmp_path, {}, ranks=2)


@pytest.mark.slow  # two generated tables and two build processes
def test_bench_index_start_up_memory_does_not_grow_with_the_sample_count(capsys):
    assert main(["bench", "index", "--samples", "20000", "--shards", "50", "--json"]) == 0
    small = json.loads(capsys.readouterr().out)
    assert set(small) >= {"samples", "shards", "peak_rss_mb", "build_s"}
    assert (small["samples"], small["shards"], small["train"], small["minival"]) == (20000, 50, 19600, 400)
    assert small["first_batch"] == 256 and small["target_shape"] == [128, 1000]  # data_ratio 1: half pseudo
    assert main(["bench", "index", "--samples", "4000000", "--shards", "50", "--json"]) == 0
    large = json.loads(capsys.readouterr().out)
    assert large["train"] == 3_920_000 and large["slots"] == 2 * 3_920_000
    # 200x the samples: an object per sample would add >600 MB (the design before: 3.4 GB per million)
    assert 0 < large["peak_rss_mb"] - small["peak_rss_mb"] < 60, (small, large)
    assert main(["bench", "index", "--samples", "10", "--shards", "20"]) == 2


def _labelled_shard(path: Path, labels: list, cut: int = 0) -> None:
    members = []
    for i, label in enumerate(labels):
        members += [(f"k{i}.jpg", jpeg_bytes(i % 4)), (f"k{i}.cls", str(label).encode())]
    write_tar(path, members)
    if cut:
        path.write_bytes(path.read_bytes()[:cut])


def test_a_label_changed_after_indexing_is_an_error_naming_shard_and_key_not_an_index_error(tmp_path):
    folder = tmp_path / "data" / "train"
    _labelled_shard(folder / "shard-00000.tar", [0, 1, 2, 3])
    shards.write_index(folder)
    raw = (folder / "shard-00000.tar").read_bytes()
    (folder / "shard-00000.tar").write_bytes(raw.replace(b"3\x00\x00", b"9\x00\x00", 1))  # same size and count
    images, _ = data.load_split(tmp_path / "data", "train", num_classes=4)
    assert images[2].label == 2
    with pytest.raises(data.DataError, match=r"shard-00000.tar: k3 has label 9, but .*index.json counted labels "
                                             r"0..3: the shards changed; rerun `rs-transfer index"):
        images[3]


@pytest.mark.parametrize("where", ["member boundary", "inside a member"])
def test_a_truncated_shard_is_an_error_not_fewer_samples(tmp_path, where):
    whole = tmp_path / "whole.tar"
    _labelled_shard(whole, [0, 1, 2, 3, 0, 1, 2, 3])
    members = shards._members(whole)[0]
    cut = members[6][1] - 512 if where == "member boundary" else members[6][1] + 100  # before k3.jpg's header
    _labelled_shard(tmp_path / "cut" / "shard-00000.tar", [0, 1, 2, 3, 0, 1, 2, 3], cut=cut)
    with pytest.raises(data.DataError, match=r"shard-00000.tar (is truncated|: unexpected end)|cannot read tar shard"):
        data.scan_shards([tmp_path / "cut" / "shard-00000.tar"])


@pytest.mark.parametrize("edit,message", [
    (lambda e: e.update(nsamples=-8), r"has nsamples -8, not an integer >= 0"),
    (lambda e: e.update(nsamples=8.7), r"has nsamples 8.7, not an integer >= 0"),
    (lambda e: e.update(url="../val/shard-00000.tar"), r"is not a path inside"),
    (lambda e: e.update(url="/data/val/shard-00000.tar"), r"is not a path inside"),
    (lambda e: e.update(url="shard-00000.tar"), r"'shard-00000.tar' is listed twice"),
])
def test_a_hand_edited_index_that_would_change_the_data_is_refused(shard_root, tmp_path, edit, message):
    index = shards.describe(shard_root / "train")
    edit(index["shardlist"][1])
    folder = tmp_path / "train"
    folder.mkdir()
    (folder / "index.json").write_text(json.dumps(index))
    with pytest.raises(data.DataError, match=message + r".*rewrite it with `rs-transfer index"):
        shards.read_index(folder)


def test_labels_that_are_not_class_indices_stop_training_not_indexing_or_pseudo_labelling(tmp_path, caplog):
    folder = tmp_path / "data" / "train"
    _labelled_shard(folder / "shard-00000.tar", [0, 1, 99999999999, 3])
    assert main(["index", str(folder), "--workers", "1"]) == 0  # no 745 GB bincount, no traceback
    assert not json.loads((folder / "index.json").read_text())["rs_transfer"]["labelled"]
    assert any("not fully labelled" in r.getMessage() for r in caplog.records)
    with pytest.raises(data.DataError, match=r"k2.cls holds b'99999999999', not a class index"):
        data.load_split(tmp_path / "data", "train", num_classes=None)
    assert len(data.list_images(folder)) == 4  # pseudo-labelling reads no label
    _labelled_shard(folder / "shard-00000.tar", [0, -1, 2, 3])
    (folder / "index.json").unlink()
    with pytest.raises(data.DataError, match=r"k1.cls holds b'-1', not a class index"):  # not "has no .cls"
        data.load_split(tmp_path / "data", "train", num_classes=None)


def test_an_index_written_by_another_tool_is_named_as_such(shard_root, tmp_path):
    index = shards.describe(shard_root / "train")
    del index["rs_transfer"]  # what wids' own indexer writes
    folder = tmp_path / "data" / "train"
    folder.mkdir(parents=True)
    for entry in index["shardlist"]:
        (folder / entry["url"]).write_bytes((shard_root / "train" / entry["url"]).read_bytes())
    (folder / "index.json").write_text(json.dumps(index))
    with pytest.raises(data.DataError, match=r"has no \"rs_transfer\" entry .*not written by `rs-transfer index`"):
        data.load_split(tmp_path / "data", "train", num_classes=4)


def test_links_in_a_shard_are_named_and_index_errors_say_where_to_look(tmp_path, caplog, capsys):
    path = tmp_path / "train" / "shard-00000.tar"
    path.parent.mkdir()
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, payload in (("k.jpg", jpeg_bytes()), ("k.cls", b"0")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        link = tarfile.TarInfo("linky.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "k.jpg"
        tar.addfile(link)
    assert [s.ref for s in data.scan_shards([path])] == ["shard-00000.tar/k"]
    assert any("1 member(s) not used: linky.jpg" in r.getMessage() for r in caplog.records)
    assert main(["index", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no .tar shards in" in err and "its sub-folders train hold shards: give each of them" in err
    assert main(["index", str(tmp_path / "nowhere")]) == 2
    assert "shard folder not found" in capsys.readouterr().err
    assert main(["index", str(tmp_path / "train"), "--workers", "0"]) == 2
    assert "--workers must be at least 1" in capsys.readouterr().err


def test_a_class_without_an_image_in_shards_is_named_in_a_warning(tmp_path, caplog):
    _labelled_shard(tmp_path / "data" / "train" / "shard-00000.tar", [1, 2, 3, 4])
    images, _ = data.load_split(tmp_path / "data", "train", num_classes=5)
    assert len(images) == 4
    assert any("1 class(es) of model.num_classes=5 have no image" in r.getMessage() and ": 0" in r.getMessage()
               for r in caplog.records)


@pytest.mark.slow  # a CLI run with loader workers
def test_a_bad_label_found_by_a_loader_worker_is_one_error_line_and_nothing_after_it(tmp_path):
    folder = tmp_path / "data" / "train"
    _labelled_shard(folder / "shard-00000.tar", [0, 1, 0, 1, 0, 1, 0, 1])
    shards.write_index(folder)
    raw = (folder / "shard-00000.tar").read_bytes()
    (folder / "shard-00000.tar").write_bytes(raw.replace(b"1\x00\x00", b"a\x00\x00", 1))  # k1.cls: "a"
    _labelled_shard(tmp_path / "data" / "val" / "shard-00000.tar", [0, 1])
    result = subprocess.run([sys.executable, "-m", "rs_transfer", "pretrain", "--config", str(DEMO), *TRAIN,
                             "data.eval_split=val", f"data.root={tmp_path / 'data'}", "data.num_workers=2",
                             "train.epochs=null", "train.steps=4", "train.batch_size=4", f"output_dir={tmp_path / 'o'}"],
                            env=script_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300,
                            cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    tail = result.stderr[result.stderr.index("error:"):].strip().splitlines()
    assert len(tail) == 1 and "k1.cls holds b'a', not a class index" in tail[0], result.stderr[-2000:]
