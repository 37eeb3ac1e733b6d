"""Whole-image vs sliding-window vs TTA evaluation of one trained run, the figures in docs/benchmarks.md
("Dense inference modes"):

    python tools/dense_inference_times.py [--task pascal_seg] [--work DIR] [--steps 200]

Trains `rs-transfer demo --task TASK` (its synthetic data and demo config; skipped when WORK/run/weights.pth is
there), then evaluates that run's weights on its validation set once per inference setting (the `predict --set`
path: runs.load_run with evaluation keys, the task's own evaluator) and prints one JSON line per setting: the keys,
the metrics without per-class entries, and the evaluation's wall seconds.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from rs_transfer.downstream import finetune, registry
from rs_transfer.runs import load_run

# Demo images are 96 x 128 and the demo trains on 64 px crops: windows of the training crop, overlapping a quarter
SETTINGS = [
    [],
    ["task.eval_mode=slide", "task.slide_crop=64", "task.slide_stride=48"],
    ["task.tta=flip"],
    ["task.tta=ms_flip"],
    ["task.eval_mode=slide", "task.slide_crop=64", "task.slide_stride=48", "task.tta=ms_flip"],
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--task", default="pascal_seg")
    parser.add_argument("--work", type=Path, help="data/ and run/ go here (default: a new temp folder)")
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="dense-inference-"))
    if not (work / "run" / "weights.pth").is_file():
        finetune.demo(args.task, work / "data", work / "run", [f"train.steps={args.steps}"])
    for keys in SETTINGS:
        run = load_run(work / "run", "cpu", keys)
        built = registry.get(args.task).build(run.config)
        start = time.perf_counter()
        with torch.no_grad():
            metrics = built.evaluate(run.model)
        seconds = time.perf_counter() - start
        print(json.dumps({"keys": keys, "metrics": {k: round(v, 4) for k, v in metrics.items() if "/" not in k},
                          "seconds": round(seconds, 2)}))


if __name__ == "__main__":
    main()
