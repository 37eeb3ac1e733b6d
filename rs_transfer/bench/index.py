"""`rs-transfer bench index`: what one rank of a co-training run builds before its first batch, at N samples.

It generates, in a work folder, a shard descriptor (index.json of N samples over S shards, no image data: the
shards themselves are never opened before the first batch) and an N-row pseudo-label table with top-k soft
labels, all selected. Then a fresh process (so the figures are the build's alone, torch's import included)
builds what `pretrain` builds on rank 0 of `world` ranks with `cotrain.enabled`: the labelled set with its
minival shards held out, the pseudo-labelled set from the table and the selection, the epoch's order, and the
first batch's sample indices and soft targets. It prints {"samples", "shards", "peak_rss_mb", "build_s"}: the
peak resident memory of that process in MiB and the wall seconds of the build (imports excluded).
"""

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from rs_transfer.errors import UserError

NUM_CLASSES = 1000
CHUNK_ROWS = 1 << 20  # rows generated at once: the generator's memory stays ~100 MB whatever N
FIRST_BATCH = 256


def write_descriptor(folder: Path, samples: int, shards: int) -> None:
    """index.json for `samples` spread evenly over `shards` shard names (the files are not written)."""
    folder.mkdir(parents=True, exist_ok=True)
    base, extra = divmod(samples, shards)
    counts = [base + (s < extra) for s in range(shards)]
    label_counts = np.bincount(np.arange(samples) % NUM_CLASSES, minlength=NUM_CLASSES) if samples < NUM_CLASSES \
        else np.full(NUM_CLASSES, samples // NUM_CLASSES) + (np.arange(NUM_CLASSES) < samples % NUM_CLASSES)
    index = {"wids_version": 1, "name": folder.name,
             "shardlist": [{"url": f"shard-{s:06d}.tar", "nsamples": n, "filesize": n * 110_000,
                            "first": f"img_{s:06d}_000000"}
                           for s, n in enumerate(counts)],
             "rs_transfer": {"format": 1, "labelled": True, "label_counts": label_counts.tolist()}}
    (folder / "index.json").write_text(json.dumps(index))
    for entry in index["shardlist"]:  # sparse files of the indexed size: start-up stats them, never reads them
        with open(folder / entry["url"], "wb") as file:
            file.truncate(entry["filesize"])


def write_pseudo_labels(folder: Path, images: Path, samples: int, topk: int) -> None:
    """An N-row table (every image labelled, all selected) in pseudo-label's output format, written in chunks."""
    from rs_transfer.pretrain import pseudo_label

    rng = np.random.default_rng(0)
    with pseudo_label.TableWriter(folder / pseudo_label.TABLE, samples, topk) as table:
        for start in range(0, samples, CHUNK_ROWS):
            rows = min(CHUNK_ROWS, samples - start)
            topk_class = rng.integers(0, NUM_CLASSES, size=(rows, topk), dtype=np.int32)
            topk_prob = np.sort(rng.random((rows, topk), dtype=np.float32), axis=1)[:, ::-1]
            topk_prob /= topk_prob.sum(axis=1, keepdims=True)
            table.append(np.arange(start, start + rows, dtype=np.int64), topk_class[:, 0], topk_prob[:, 0],
                         topk_class, topk_prob)
    selected = np.lib.format.open_memmap(folder / "selected.npy", mode="w+", dtype=np.int64, shape=(samples,))
    for start in range(0, samples, CHUNK_ROWS):
        selected[start:start + CHUNK_ROWS] = np.arange(start, min(samples, start + CHUNK_ROWS))
    selected.flush()
    del selected
    meta = {"format": pseudo_label.FORMAT, "images": str(images), "samples": samples, "threshold": 0.0,
            "per_class": 0, "num_classes": NUM_CLASSES, "k": topk, "world_size": 1, "labelled": samples,
            "unreadable": 0, "selected": samples, "table": pseudo_label.TABLE}
    (folder / "meta.json").write_text(json.dumps(meta))


def build_one_rank(root: Path, world: int) -> dict:
    """Build rank 0's training data of a co-training run on ROOT/train with ROOT/pseudo: the labelled set (minival
    shards held out), the pseudo-labelled set, the first batch's keys and its pseudo-labelled samples' targets.
    The labelled samples' labels live in the shards, which a batch reads in the loader: not part of start-up."""
    from rs_transfer.config import load_config, string_override
    from rs_transfer.engine.sampling import RunSampler
    from rs_transfer.pretrain import cotrain, data, transforms
    from rs_transfer.pretrain.config import PretrainConfig
    from rs_transfer.pretrain.task import build_datasets

    config = load_config(PretrainConfig, None, [string_override("data.root", root), "data.eval_split=minival",
                                                "cotrain.enabled=true",
                                                string_override("cotrain.pseudo_labels", root / "pseudo")])
    train_items, eval_items, _ = build_datasets(config)
    labelled = data.ImageDataset(train_items, transforms.eval_transform(32))
    train_set, collate = cotrain.build(config, labelled, config.model.num_classes)
    sampler = RunSampler(train_set, num_replicas=world, rank=0, seed=0)
    sampler.start, sampler.count = (0, 0), FIRST_BATCH
    slots = [index for _, index in sampler]
    pseudo_slots = slots[len(slots) - cotrain.pseudo_count(len(slots), config.cotrain.data_ratio):]
    targets = torch.stack([collate.pseudo.targets[slot % len(collate.pseudo)] for slot in pseudo_slots])
    return {"train": len(train_items), "minival": len(eval_items), "slots": len(train_set),
            "first_batch": len(slots), "target_shape": list(targets.shape)}


def _child(root: str, world: int) -> None:
    start = time.perf_counter()
    built = build_one_rank(Path(root), world)
    seconds = time.perf_counter() - start
    print(json.dumps({**built, "peak_rss_mb": round(peak_rss_mb(), 1), "build_s": round(seconds, 3)}))


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB: VmHWM on Linux, which starts afresh at exec (getrusage's
    ru_maxrss is carried over from the parent that forked it, here the generator), else ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def bench_index(samples: int, shards: int, world: int = 8, topk: int = 10, work_dir: str | None = None) -> dict:
    """Generate the descriptor and table of `samples` over `shards`, build one rank in a fresh process, and
    return {"samples", "shards", "peak_rss_mb", "build_s", ...}. Raises UserError for nonsense sizes."""
    if shards < 2 or shards > samples or samples < NUM_CLASSES:
        raise UserError(f"bench index needs 2 <= shards <= samples and samples >= {NUM_CLASSES} (the generated labels "
                        f"cover {NUM_CLASSES} classes), got --samples {samples} --shards {shards}")
    if world < 1 or topk < 1:
        raise UserError(f"bench index needs --world >= 1 and --topk >= 1, got {world} and {topk}")
    with tempfile.TemporaryDirectory(prefix="bench-index-", dir=work_dir) as tmp:
        root = Path(tmp)
        generate_start = time.perf_counter()
        write_descriptor(root / "train", samples, shards)
        write_pseudo_labels(root / "pseudo", root / "train", samples, topk)
        generate_s = time.perf_counter() - generate_start
        child = subprocess.run([sys.executable, "-c", f"from rs_transfer.bench.index import _child; "
                                f"_child({str(root)!r}, {world})"], capture_output=True, text=True,
                               env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if child.returncode != 0:
            raise RuntimeError(f"bench index: the build process failed:\n{child.stderr[-3000:]}")
        built = json.loads(child.stdout.strip().splitlines()[-1])
    return {"samples": samples, "shards": shards, "peak_rss_mb": built.pop("peak_rss_mb"),
            "build_s": built.pop("build_s"), "world": world, "generate_s": round(generate_s, 1), **built}
