"""Images/s of training log windows that contain an epoch start against the others (persistent workers: one loader iterator per run).

    python tools/epoch_start_throughput.py [--workers 2] [--epochs 8] [--out DIR]

Runs the pretraining demo (rs26-w0.25 at 32 px, batch 32, 8 steps an epoch, a log event every 2 steps) on a
generated folder dataset and reads OUTPUT_DIR/metrics.jsonl. A window (step - 2, step] contains an epoch start
when step % 8 == 2. Prints JSON: the mean images/s of both kinds of window and their ratio. The first epoch is
left out (start-up, first workers).
"""

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from rs_transfer.pretrain.run import pretrain
from rs_transfer.pretrain.synthetic import make_folder_dataset

CONFIG = "pretrain/demo.yaml"  # a config shipped in the package
STEPS_PER_EPOCH, LOG_EVERY = 8, 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--out", help="run folder (default: a temporary folder)")
    args = parser.parse_args()
    work = Path(args.out or tempfile.mkdtemp(prefix="epoch-starts-"))
    data = make_folder_dataset(work / "data", num_classes=4, train_per_class=64, val_per_class=4)
    pretrain(CONFIG, [f"data.root={data}", f"output_dir={work / 'run'}", f"train.epochs={args.epochs}",
                           "train.batch_size=32", "data.image_size=32", f"data.num_workers={args.workers}",
                           f"train.log_every_steps={LOG_EVERY}", "train.eval_every_epochs=0"])
    events = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    windows = [(e["step"], e["images_per_s"]) for e in events if e["kind"] == "train" and e["step"] > STEPS_PER_EPOCH]
    starts = [speed for step, speed in windows if step % STEPS_PER_EPOCH == LOG_EVERY]
    others = [speed for step, speed in windows if step % STEPS_PER_EPOCH != LOG_EVERY]
    print(json.dumps({"workers": args.workers, "windows_with_epoch_start": round(statistics.mean(starts), 1),
                      "other_windows": round(statistics.mean(others), 1),
                      "ratio": round(statistics.mean(starts) / statistics.mean(others), 3)}))


if __name__ == "__main__":
    main()
