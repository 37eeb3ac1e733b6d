"""What the first data path (one object per sample) built on every rank before its first batch, at N samples, for the table in
docs/benchmarks.md ("Start-up at 130M samples"): one `Item` per sample from the shard scan (ref, label, (tar,
offset, size)), the pseudo-label JSONL read as one dict per image plus co-training's dict by ref, and
DistributedSampler's materialised permutation (`torch.randperm(N).tolist()`). Image data and tar headers are not
read (the scan's I/O is left out, so this is a lower bound). Prints {"samples", "peak_rss_mb", "build_s"}.

    python tools/index_today.py --samples 1000000
"""

import argparse
import json
import resource
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Item:  # as rs_transfer/pretrain/data.py had it
    ref: str
    label: int
    where: object


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=1_000_000)
    parser.add_argument("--per-shard", type=int, default=10_000)
    args = parser.parse_args()
    n = args.samples
    lines = [json.dumps({"ref": f"shard-{i // args.per_shard:06d}.tar/img_{i:09d}", "label": i % 1000,
                         "confidence": 0.5, "topk": [[(i + k) % 1000, 0.1] for k in range(10)]})
             for i in range(n)]  # the selected.jsonl text as read from disk
    start = time.perf_counter()
    items = [Item(f"shard-{i // args.per_shard:06d}.tar/img_{i:09d}", i % 1000,
                  (f"/data/train/shard-{i // args.per_shard:06d}.tar", 512 * i, 110_000)) for i in range(n)]
    records = [json.loads(line) for line in lines]
    by_ref = {item.ref: item for item in items}
    pseudo = [by_ref[r["ref"]] for r in records]
    order = torch.randperm(n).tolist()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    del lines  # only the parsed form counts against the design; the text was held to time the parse alone
    print(json.dumps({"samples": n, "peak_rss_mb": round(peak, 1), "build_s": round(seconds, 2),
                      "objects": len(items) + len(records) + len(pseudo) + len(order)}))


if __name__ == "__main__":
    main()
