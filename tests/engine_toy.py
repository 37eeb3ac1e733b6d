"""A toy task for the engine tests: a small MLP classifying points that a fixed linear map labels.

Run as a script (`python tests/engine_toy.py OUTPUT_DIR [key=value ...] [--kill-at N [--kill-rank R]] [--nan-at N]
[--term-group-at-index I]`) it trains through `rs_transfer.engine.trainer.train`, which lets tests launch it under
torchrun, kill it with SIGKILL, or signal its whole process group from a DataLoader worker as SLURM does.
The dataset adds random noise to every sample and the model has dropout, so a resumed run only matches an
uninterrupted one when the engine restores the RNG states and the sampler position exactly.
"""

import argparse
import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

import rs_transfer
from rs_transfer.config import RunConfig, load_config
from rs_transfer.engine.distributed import all_reduce_sum, shard
from rs_transfer.engine.task import Task
from rs_transfer.engine.trainer import train
from rs_transfer.errors import StoppedBySignal

DIM, CLASSES = 8, 4
TOY = Path(__file__)
REPO = TOY.parent.parent
CONFIGS = Path(rs_transfer.__file__).resolve().parent / "configs"  # the YAML configs, shipped as package data


def script_env(**extra) -> dict:
    """The environment for running this file (or `python -c`) in a subprocess against this checkout."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), **extra}


@contextmanager
def folder_held(folder):
    """Another live process holding `folder`'s lock (rs_transfer.files.folder_lock), as a job still writing there
    would; yields its pid; SIGKILLed at the end, as a job that dies."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom rs_transfer.files import folder_lock\n"
         f"with folder_lock({str(folder)!r}, 'held'):\n    print('held', flush=True)\n    time.sleep(600)"],
        env=script_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()


class Points(Dataset):
    def __init__(self, n: int, seed: int, noise: float = 0.1, kill_at: int | None = None, kill_with=signal.SIGKILL,
                 term_group_at: int | None = None, marker: str | None = None, group_signal=signal.SIGTERM,
                 kill_times: int = 1):
        generator = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, DIM, generator=generator)
        labeller = torch.randn(DIM, CLASSES, generator=torch.Generator().manual_seed(1234))
        self.y = (self.x @ labeller).argmax(1)
        self.noise = noise
        self.kill_at, self.kill_times = kill_at, kill_times
        self.kill_with = kill_with
        self.term_group_at = term_group_at  # sample index whose fetch sends SIGTERM to the process group, once
        self.marker = marker  # a file that records that it was sent (each worker holds its own copy of this set)
        self.group_signal = group_signal
        self.fetched = 0

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        self.fetched += 1
        if self.kill_at is not None and self.fetched == self.kill_at + 1:
            for _ in range(self.kill_times):  # a second Ctrl-C while the first is being acted on
                os.kill(os.getpid(), self.kill_with)
        if i == self.term_group_at and not os.path.exists(self.marker):
            Path(self.marker).touch()
            os.killpg(os.getpgid(0), self.group_signal)
        return self.x[i] + self.noise * torch.randn(DIM), self.y[i]


class ToyNet(nn.Module):
    def __init__(self, bn: bool = False, dropout: float = 0.1, nan_at: int | None = None, loss_gain: float = 1.0):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(DIM, 32), nn.BatchNorm1d(32) if bn else nn.Identity(), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(32, CLASSES),
        )
        self.nan_at = nan_at
        self.loss_gain = loss_gain  # x1000 with train.lr / 1000: the same updates, gradients that overflow fp16
        self.calls = 0

    def forward(self, batch):
        x, y = batch
        self.calls += 1
        logits = self.net(x).float()
        loss = F.cross_entropy(logits, y) * self.loss_gain
        if self.nan_at is not None and self.calls >= self.nan_at:
            loss = loss * float("nan")
        return {"loss": loss, "accuracy": (logits.argmax(1) == y).float().mean()}


def make_evaluate(val_set: Dataset):
    def evaluate(model: nn.Module) -> dict:
        correct = torch.zeros(2)
        for x, y in DataLoader(shard(val_set), batch_size=64):
            logits = model.net(x)
            correct += torch.tensor([(logits.argmax(1) == y).sum().item(), len(y)])
        correct = all_reduce_sum(correct)
        return {"accuracy": (correct[0] / correct[1]).item()}

    return evaluate


def make_task(n: int = 256, bn: bool = False, dropout: float = 0.1, noise: float = 0.1, kill_at=None,
              kill_with=signal.SIGKILL, nan_at=None, seed: int = 0, term_group_at=None, marker=None,
              group_signal=signal.SIGTERM, loss_gain: float = 1.0, kill_times: int = 1) -> Task:
    torch.manual_seed(seed)
    model = ToyNet(bn=bn, dropout=dropout, nan_at=nan_at, loss_gain=loss_gain)
    val = Points(128, seed=99, noise=0.0)
    train_set = Points(n, seed=1, noise=noise, kill_at=kill_at, kill_with=kill_with, term_group_at=term_group_at,
                       marker=marker, group_signal=group_signal, kill_times=kill_times)
    return Task(model=model, train_set=train_set, evaluate=make_evaluate(val), primary_metric="accuracy")


def toy_config(output_dir, *overrides) -> RunConfig:
    defaults = ["train.epochs=2", "train.batch_size=16", "train.amp=none", "train.channels_last=false",
                "train.lr=1.6", "train.weight_decay=0", "train.log_every_steps=4", "data.num_workers=0",
                "train.device=cpu", f"output_dir={output_dir}"]
    return load_config(RunConfig, None, defaults + list(overrides))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--kill-at", type=int, help="signal this process when fetching sample number N + 1")
    parser.add_argument("--signal", default="SIGKILL", help="the signal --kill-at sends")
    parser.add_argument("--signal-times", type=int, default=1, help="how many times --kill-at sends it")
    parser.add_argument("--kill-rank", type=int, help="--kill-at kills this rank alone, and only in torchrun's first "
                        "worker group (a group that torchrun --max-restarts restarted runs on)")
    parser.add_argument("--nan-at", type=int)
    parser.add_argument("--term-group-at-index", type=int,
                        help="signal the whole process group when sample I is fetched (once per output dir)")
    parser.add_argument("--group-signal", default="SIGTERM", help="the signal --term-group-at-index sends")
    parser.add_argument("--bn", action="store_true")
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--noise", type=float, default=0.1)
    parser.add_argument("--loss-gain", type=float, default=1.0, help="the loss times this (see ToyNet)")
    args = parser.parse_intermixed_args(argv)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    config = toy_config(args.output_dir, *args.overrides)
    first_group = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    killed = args.kill_rank is None or (first_group and int(os.environ.get("RANK", 0)) == args.kill_rank)
    task = make_task(bn=args.bn, dropout=args.dropout, noise=args.noise, kill_at=args.kill_at if killed else None,
                     kill_with=signal.Signals[args.signal], nan_at=args.nan_at,
                     term_group_at=args.term_group_at_index, marker=str(Path(args.output_dir) / "signal_sent"),
                     group_signal=signal.Signals[args.group_signal], loss_gain=args.loss_gain,
                     kill_times=args.signal_times)
    try:
        train(config, task)
    except StoppedBySignal as stop:  # what the CLI does: one line, the signal's exit code
        print(f"stopped: {stop}", file=sys.stderr)
        return stop.exit_code


if __name__ == "__main__":
    sys.exit(main())


def run_forked(*args) -> subprocess.CompletedProcess:
    """What `python engine_toy.py ARGS` does, in a process forked from this one (forked_ranks, world size 1, in its
    own process group): the same signals and exit codes without a fresh interpreter's imports."""
    from forked_ranks import run_ranks

    return run_ranks(main, [str(arg) for arg in args], world_size=1)


def same_weights(a: Path, b: Path) -> None:
    """Assert two checkpoint files (final.pt: {"model", "ema"?}) hold bitwise equal tensors."""
    first, second = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert first.keys() == second.keys()
    for part in first:
        for key, value in first[part].items():
            assert torch.equal(value, second[part][key]), (part, key)


def killed_and_resumed_ends_where_it_would_have(args: list, tmp_path: Path, env: dict, timeout: int = 300,
                                                ranks: int = 0) -> None:
    """Run the CLI command `args` (without output_dir) to the end in TMP/reference; run it again in TMP/killed,
    SIGKILL its process group as soon as a step checkpoint exists, rerun it with --resume, and assert both runs
    end with bitwise equal final.pt and equal final_metrics.json.
    With `ranks`, `args` are the CLI's arguments alone (no interpreter) and each run is that many ranks forked from
    this process (forked_ranks.Ranks; `env` added to theirs) instead of a subprocess."""
    import json
    import subprocess
    import time

    from forked_ranks import Ranks
    from rs_transfer.cli import main

    def run(*extra):
        if ranks:
            return Ranks(main, [*args, *extra], world_size=ranks, env=env).wait(timeout)
        return subprocess.run([*args, *extra], env=env, capture_output=True, text=True, timeout=timeout)

    def start(*extra):
        if ranks:
            return Ranks(main, [*args, *extra], world_size=ranks, env=env)
        return subprocess.Popen([*args, *extra], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)

    def kill(started) -> None:
        if ranks:
            started.kill()
        else:
            os.killpg(started.pid, signal.SIGKILL)
            started.wait()

    reference, killed = tmp_path / "reference", tmp_path / "killed"
    done = run(f"output_dir={reference}")
    assert done.returncode == 0, done.stderr[-3000:]
    started = start(f"output_dir={killed}")
    deadline = time.monotonic() + timeout
    while not list((killed / "checkpoints").glob("step_*.pt")) and time.monotonic() < deadline:
        time.sleep(0.01)
    kill(started)
    assert not (killed / "final.pt").exists(), "the run finished before the kill: nothing was tested"
    resumed = run(f"output_dir={killed}", "--resume")
    assert resumed.returncode == 0 and "resumed from" in resumed.stderr, resumed.stderr[-3000:]
    same_weights(reference / "final.pt", killed / "final.pt")
    assert (json.loads((reference / "final_metrics.json").read_text())
            == json.loads((killed / "final_metrics.json").read_text()))
