"""Seconds of evaluation and checkpoint bookkeeping per epoch of a CPU run through the engine.

    OMP_NUM_THREADS=1 python tools/bookkeeping_time.py [--width 2048] [--epochs 4] [--repeats 3] [--out DIR]

A wide MLP (about 13.6M parameters at width 2048: a 110 MB checkpoint with its SGD momentum) trains `--epochs`
short epochs twice per repeat, interleaved: once evaluating and checkpointing after every epoch (train.eval_every_
epochs=1) and once only at the end (=0). Two figures, medians over repeats:
  blocking_s_per_epoch: (wall_s - train_s) / epochs of the evaluating run, from its summary.json: the seconds the
      training thread spent evaluating and checkpointing per epoch (what an asynchronous write overlaps with training
      is not in it);
  wall_s_per_epoch: (wall time with - wall time without) / (epochs - 1): everything, contention with a background
      write included; noisy on a shared machine.
Run it against another checkout (the code before a change) with PYTHONPATH=THAT_CHECKOUT to compare, interleaved.
Prints one JSON line.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import rs_transfer
from rs_transfer.config import RunConfig, load_config
from rs_transfer.engine.distributed import all_reduce_sum, shard
from rs_transfer.engine.task import Task
from rs_transfer.engine.trainer import train

DIM, CLASSES = 512, 10


class WideNet(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(DIM, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                                 nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                                 nn.Linear(width, CLASSES))

    def forward(self, batch):
        x, y = batch
        return {"loss": F.cross_entropy(self.net(x), y)}


def make_task(width: int, train_size: int, eval_size: int) -> Task:
    torch.manual_seed(0)
    x, y = torch.randn(train_size + eval_size, DIM), torch.randint(0, CLASSES, (train_size + eval_size,))
    train_set, val_set = TensorDataset(x[:train_size], y[:train_size]), TensorDataset(x[train_size:], y[train_size:])

    def evaluate(model):
        correct = torch.zeros(2)
        for xs, ys in DataLoader(shard(val_set), batch_size=256):
            correct += torch.tensor([(model.net(xs).argmax(1) == ys).sum().item(), len(ys)])
        correct = all_reduce_sum(correct)
        return {"accuracy": (correct[0] / correct[1]).item()}

    return Task(model=WideNet(width), train_set=train_set, evaluate=evaluate, primary_metric="accuracy")


def run_seconds(out: Path, args, every: int) -> float:
    config = load_config(RunConfig, None, [
        f"output_dir={out}", f"train.epochs={args.epochs}", f"train.batch_size={args.batch_size}", "train.amp=none",
        "train.channels_last=false", "train.device=cpu", "data.num_workers=0", "train.log_every_steps=1000",
        f"train.eval_every_epochs={every}", "train.keep_last=2", "train.lr=0.01"])
    task = make_task(args.width, args.train_size, args.eval_size)
    start = time.perf_counter()
    train(config, task)
    wall = time.perf_counter() - start
    summary = json.loads((out / "summary.json").read_text())
    return wall, (summary["wall_s"] - summary["train_s"]) / args.epochs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--train-size", type=int, default=256)
    parser.add_argument("--eval-size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="a folder for the runs (default: a temp folder)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    base = args.out or Path(tempfile.mkdtemp(prefix="bookkeeping-"))
    with_eval, without, blocking = [], [], []
    for repeat in range(args.repeats):
        wall, blocked = run_seconds(base / f"every-{repeat}", args, every=1)
        with_eval.append(wall)
        blocking.append(blocked)
        without.append(run_seconds(base / f"end-{repeat}", args, every=0)[0])
    checkpoint = base / "every-0" / "checkpoints" / "best.pt"
    per_epoch = [(a - b) / (args.epochs - 1) for a, b in zip(with_eval, without)]
    print(json.dumps({
        "code": str(Path(rs_transfer.__file__).resolve().parent.parent),
        "checkpoint_mb": round(checkpoint.stat().st_size / 2**20, 1),
        "epochs": args.epochs, "repeats": args.repeats,
        "wall_s_eval_every_epoch": [round(s, 2) for s in with_eval],
        "wall_s_eval_at_end": [round(s, 2) for s in without],
        "blocking_s_per_epoch": round(statistics.median(blocking), 3),
        "blocking_s_per_epoch_each": [round(s, 3) for s in blocking],
        "wall_s_per_epoch": round(statistics.median(per_epoch), 3),
        "wall_s_per_epoch_each": [round(s, 3) for s in per_epoch],
    }))


if __name__ == "__main__":
    sys.exit(main())
