"""Times behind docs/pretrain.md's shard and pseudo-label figures: opening a 10k-sample shard with wids' mmap
reader (shards.open_shard) against Python's tarfile scan, reading one sample after, and pseudo_label.select on an
N-row table (threshold alone, and with per-class balancing). Page cache warm; one process.

    python tools/shard_and_table_times.py [--rows 10000000]
"""

import argparse
import io
import json
import random
import resource
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from rs_transfer.pretrain import data, pseudo_label, shards


def shard_times(folder: Path, samples: int = 10_000) -> dict:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(buffer, "JPEG")
    path = folder / "shard-00000.tar"
    with tarfile.open(path, "w") as tar:
        for i in range(samples):
            for extension, payload in ((".jpg", buffer.getvalue()), (".cls", str(i % 1000).encode())):
                info = tarfile.TarInfo(f"s{i:06d}{extension}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    start = time.perf_counter()
    shard = shards.open_shard(path)
    wids_s = time.perf_counter() - start
    start = time.perf_counter()
    shards._tarfile_members(path)
    tarfile_s = time.perf_counter() - start
    images = shards.ShardImages(folder, shards.describe(folder))
    images[0]
    picks = random.Random(0).sample(range(samples), 2000)
    start = time.perf_counter()
    for i in picks:
        data.read_bytes(images[i].where)
    per_sample = (time.perf_counter() - start) / len(picks)
    return {"shard_samples": len(shard.keys), "open_wids_ms": round(1000 * wids_s, 1),
            "open_tarfile_ms": round(1000 * tarfile_s, 1), "read_sample_us": round(1e6 * per_sample, 1)}


def select_times(rows: int) -> dict:
    rng = np.random.default_rng(0)
    table = {"index": np.arange(rows, dtype=np.int64), "label": rng.integers(0, 1000, rows, dtype=np.int32),
             "confidence": rng.random(rows, dtype=np.float32)}
    out = {}
    for name, per_class in (("select_threshold_s", 0), ("select_per_class_s", rows // 1000)):
        start = time.perf_counter()
        selected = pseudo_label.select(table, 0.3, per_class)
        out[name] = round(time.perf_counter() - start, 2)
        out[name.replace("_s", "_rows")] = len(selected)
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=10_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = shard_times(Path(tmp))
    print(json.dumps({**result, "rows": args.rows, **select_times(args.rows)}))


if __name__ == "__main__":
    main()
