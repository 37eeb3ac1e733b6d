"""The one training loop: every task (pretraining, the transfer tasks, video) runs through `train`.

The loop knows nothing about the task (see task.py): it moves batches to the device, calls the model, steps
SGD and the LR schedule on the global step, keeps the EMA, evaluates, checkpoints and logs. The same code runs
as one process or as many under torchrun/SLURM (DDP; see distributed.py).

Exact resume: the data order of an epoch is a function of (seed, epoch) alone (RunSampler), a
checkpoint stores the position inside the epoch and every rank's RNG states, and the LR is a function of the
step. A run killed and resumed therefore continues with the same batches, the same random augmentations (in the
main process the checkpoint restores the generators; in worker processes each sample seeds them from (seed,
epoch, index), see SeededSamples) and the same updates; on CPU the final weights are bitwise those of an
uninterrupted run (tests/test_engine_resume.py).
"""

import json
import logging
import math
import random
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, get_worker_info

from rs_transfer.config import RESUME_MAY_CHANGE, ConfigError, RunConfig, flatten, run_differences, save_config, to_dict
from rs_transfer.engine import checkpoint as ckpt
from rs_transfer.engine import shuffle
from rs_transfer.engine.distributed import (
    all_gather_object,
    all_reduce_max,
    all_reduce_sum,
    broadcast_buffers,
    broadcast_object,
    init_distributed,
    seed_everything,
)
from rs_transfer.engine.ema import Ema
from rs_transfer.engine.loader import Loader, stop_signals_handled, stop_signals_recorded
from rs_transfer.engine.optim import build_optimizer, build_scheduler
from rs_transfer.engine.task import Task
from rs_transfer.errors import StoppedBySignal, UserError, one_line
from rs_transfer.files import atomic_write_json, atomic_write_text, remove_stale_temp_files, to_json

log = logging.getLogger(__name__)

class NonFiniteLossError(UserError):
    pass


class RunSampler(Sampler):
    """The keys (epoch, index) this rank loads for the rest of the run, from `start` = (epoch, position in this
    rank's part of it) on, `count` keys in all.

    Each epoch is a seeded shuffle of the dataset (engine/shuffle.py: computed a chunk at a time, never held
    whole), split over ranks as DistributedSampler splits it, and cut to `samples_per_epoch` (whole optimizer
    steps), so batches never straddle two epochs. One loader iterator serves the whole run: its workers keep
    loading ahead across epoch boundaries, and each sample's epoch travels with its key.
    """

    CHUNK = 65536  # positions computed at once: memory stays this size whatever the dataset's

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int):
        self.size, self.world, self.rank, self.seed = len(dataset), num_replicas, rank, seed
        # Tar shards want an order that keeps to a few shards at a time (shards.py): blocks, and contiguous
        # parts per rank; other datasets read any sample as cheaply, so their order is one global shuffle.
        self.block = int(getattr(dataset, "locality", 0) or 0)
        self.num_samples = math.ceil(self.size / num_replicas)  # per rank and epoch, as DistributedSampler
        self.samples_per_epoch = self.num_samples
        self.start = (0, 0)
        self.count = 0

    def __iter__(self):
        epoch, offset = self.start
        left = self.count
        while left > 0:
            stop = min(self.samples_per_epoch, offset + left)
            for first in range(offset, stop, self.CHUNK):
                for index in self.indices(epoch, first, min(first + self.CHUNK, stop)).tolist():
                    yield epoch, index
            left -= stop - offset
            epoch, offset = epoch + 1, 0

    def __getitem__(self, position: int) -> tuple:
        """Key `position` of this rank's keys (what iterating yields, as a sequence for loaders that read ahead by
        position, e.g. DALI's external source); computed a chunk at a time and the last chunk kept."""
        if not 0 <= position < self.count:
            raise IndexError(f"key {position} of {self.count}")
        epoch, offset = self.start
        offset += position
        epoch, offset = epoch + offset // self.samples_per_epoch, offset % self.samples_per_epoch
        first = offset - offset % self.CHUNK
        if getattr(self, "_chunk", (None,))[0] != (epoch, first):
            self._chunk = (epoch, first), self.indices(epoch, first, min(first + self.CHUNK, self.samples_per_epoch))
        return epoch, int(self._chunk[1][offset - first])

    def indices(self, epoch: int, start: int, stop: int) -> np.ndarray:
        """Sample indices of this rank's positions start..stop-1 of `epoch`."""
        if self.block:
            positions = shuffle.rank_range_positions(start, stop, self.size, self.rank, self.world)
            return shuffle.permute_blocked(positions, self.size, self.block, self.seed, epoch)
        positions = shuffle.rank_positions(start, stop, self.size, self.rank, self.world)
        return shuffle.permute(positions, self.size, self.seed, epoch)

    def __len__(self) -> int:
        return self.count


class SeededSamples(Dataset):
    """Item (epoch, index): sample `index`, after seeding the torch, numpy and random generators from (seed, epoch,
    index).

    A sample's random augmentation then depends on nothing else: not on which worker loads it, how many workers
    there are (none included), or where a resumed epoch restarts, so resume is exact and `data.num_workers` may
    change between a run and its resume. In the main process (num_workers=0) the global generators also drive
    dropout and stochastic depth, so their state is put back after the sample: training draws the same random
    numbers with or without workers.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple):
        epoch, index = key
        if get_worker_info() is not None:  # a worker process: its generators serve the samples alone
            self._seed(epoch, index)
            return self.dataset[index]
        states = torch.get_rng_state(), np.random.get_state(), random.getstate()
        try:
            self._seed(epoch, index)
            return self.dataset[index]
        finally:
            torch.set_rng_state(states[0])
            np.random.set_state(states[1])
            random.setstate(states[2])

    def _seed(self, epoch: int, index: int) -> None:
        seed = hash((self.seed, epoch, index)) % 2**63
        torch.default_generator.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)


@dataclass
class Progress:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # the epoch being run (epochs done, at an epoch boundary)
    step_in_epoch: int = 0
    best: float | None = None
    metrics: dict = field(default_factory=dict)  # the last evaluation
    metrics_step: int = -1  # the step `metrics` were computed at
    eval_pending: bool = False  # checkpointed just before an evaluation of this step, which has not finished


def micro_batch_size(batch_size: int, world_size: int, grad_accum_steps: int) -> int:
    """The per-process batch of one forward pass; the global batch must split evenly."""
    if grad_accum_steps < 1:
        raise ConfigError(f"train.grad_accum_steps must be >= 1, not {grad_accum_steps}")
    parts = world_size * grad_accum_steps
    if batch_size < 1 or batch_size % parts:
        raise ConfigError(
            f"train.batch_size={batch_size} is the global batch and must be divisible by processes x "
            f"train.grad_accum_steps = {world_size} x {grad_accum_steps} = {parts}"
        )
    return batch_size // parts


def train(config: RunConfig, task: Task) -> dict:
    """Train `task.model` as `config.train` says; return the final evaluation (also OUTPUT_DIR/final_metrics.json)."""
    # A stop signal can arrive while the trainer is being set up (under torchrun, another rank's loader workers may
    # already be running and the signal goes to the whole group): it is noted, not fatal, and acted on at once.
    with stop_signals_recorded() as received:
        trainer = Trainer(config, task)
        trainer.signalled = received.signalled
        return trainer.run()


class Trainer:
    """One run: set up in __init__ (devices, model, data, optimizer, resume), then `run()` is the loop."""

    def __init__(self, config: RunConfig, task: Task):
        tc = self.tc = config.train
        self.config, self.task = config, task
        if (tc.epochs is None) == (tc.steps is None):
            raise ConfigError("give exactly one of train.epochs and train.steps")
        if isinstance(task.train_set, IterableDataset):
            raise TypeError("task.train_set must be a map-style Dataset (indexable): the engine shards, shuffles "
                            "and resumes it by index")
        info = self.info = init_distributed(tc.device)
        self.micro = micro_batch_size(tc.batch_size, info.world_size, tc.grad_accum_steps)
        self.main = info.rank == 0
        seed_everything(config.seed + info.rank)
        self.resolved = to_dict(config)
        self.out = Path(config.output_dir)
        self.ckpt_dir = self.out / "checkpoints"
        # Rank 0 picks the checkpoint and tells the others, so all ranks resume from one file (or all stop).
        resume_from, problem = broadcast_object(_pick_resume(tc.resume, self.ckpt_dir) if self.main else None)
        if problem:
            raise ckpt.CheckpointError(problem)

        model = self.model = task.model
        if tc.sync_bn and info.world_size > 1:
            if info.device.type != "cuda":
                raise ConfigError("train.sync_bn needs CUDA devices (PyTorch's SyncBatchNorm has no CPU kernel)")
            model = self.model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model.to(info.device)
        if info.device.type == "cuda":
            # Training inputs keep one size, so cuDNN's per-shape algorithm search pays off after the first steps.
            torch.backends.cudnn.benchmark = True
        if tc.channels_last:
            to_channels_last(model)
        model.train()
        self.ema = Ema(model, tc.ema_decay, tc.ema_warmup) if tc.ema_decay is not None else None

        self.sampler = RunSampler(task.train_set, num_replicas=info.world_size, rank=info.rank, seed=config.seed)
        self.loader = (self._build_loader() if task.make_loader is None
                       else task.make_loader(self.sampler, self.micro, info.device))
        self.steps_per_epoch = self.sampler.num_samples // (self.micro * tc.grad_accum_steps)
        if self.steps_per_epoch == 0:
            raise ConfigError(f"the training set has {len(task.train_set)} samples, fewer than one step of "
                              f"train.batch_size={tc.batch_size}")
        self.sampler.samples_per_epoch = self.steps_per_epoch * self.micro * tc.grad_accum_steps
        self.total = tc.steps if tc.steps is not None else tc.epochs * self.steps_per_epoch
        self.optimizer = build_optimizer(model, tc)
        self.scheduler = build_scheduler(self.optimizer, tc, self.total, self.steps_per_epoch)
        self.progress = Progress()
        if resume_from is not None:
            self.progress = _restore(resume_from, config, info, model, self.ema, self.optimizer, self.scheduler)
            if self.main:
                log.info("resumed from %s at step %d (epoch %d, step %d in it)", resume_from, self.progress.step,
                         self.progress.epoch, self.progress.step_in_epoch)
        if self.progress.step > self.total:
            raise ConfigError(f"the run is {self.total} steps long (train.steps / train.epochs), but checkpoint "
                              f"{resume_from} is at step {self.progress.step}: it cannot continue from there")
        self.last_saved = resume_from
        if self.main:  # only once the resume is accepted: a refused one leaves the run's config.yaml as it was
            _prepare_output(config, self.out, self.ckpt_dir)

        self.ddp = None
        if info.world_size > 1:
            device_ids = [info.device.index] if info.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(model, device_ids=device_ids,
                                               find_unused_parameters=tc.find_unused_parameters)
        wrapped = self.ddp or model
        self.forward = torch.compile(wrapped) if tc.compile else wrapped

        self.logger = RunLogger(self.out, enabled=self.main, total=self.total, start_step=self.progress.step,
                                resumed=resume_from is not None)
        # Non-finite losses are flagged on the device and checked at log events and before checkpoints: no GPU
        # sync per step, and no checkpoint ever holds the weights of a diverged run.
        self.nonfinite = torch.zeros((), device=info.device)
        self.signalled: str | None = None  # the name of a stop signal this process received
        self.stop_requested = False  # some process received one (agreed at the last log event)
        self.sums: dict[str, torch.Tensor] = {}  # the model's logged values, summed over micro-batches
        self.micro_count = 0
        self.tic, self.tic_step, self.paused = time.perf_counter(), self.progress.step, 0.0

    def run(self) -> dict:
        # SLURM sends SIGTERM (or the --signal of the job script, e.g. USR1) before it stops a job; torchrun passes
        # SIGTERM on; Ctrl-C sends SIGINT. The run then checkpoints at its next log event and stops with a message
        # saying how to resume (a second Ctrl-C quits at once).
        with stop_signals_handled(self._on_signal):
            try:
                return self._run()
            finally:
                self._stop_workers()
                self.logger.close()

    def _stop_workers(self) -> None:
        """Shut the loader's workers down now, also when the run fails: left to the iterator's garbage collection
        at exit, after engine.loader has killed them, it prints a second traceback under the error line."""
        shutdown = getattr(getattr(self, "batches", None), "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        self.batches = None

    def _on_signal(self, number, frame) -> None:
        if number == signal.SIGINT:
            if self.signalled == "SIGINT":
                raise KeyboardInterrupt
            log.warning("Ctrl-C: stopping after a checkpoint at the next log event; Ctrl-C again quits at once")
        self.signalled = signal.Signals(number).name

    def _run(self) -> dict:
        progress = self.progress
        if progress.eval_pending:  # resumed from the checkpoint written before an evaluation that did not finish
            self._evaluate_and_save()
        per_step = self.micro * self.tc.grad_accum_steps
        self.sampler.start = (progress.epoch, progress.step_in_epoch * per_step)
        self.sampler.count = (self.total - progress.step) * per_step
        batches = iter(self.loader) if progress.step < self.total else None  # no workers for a finished run
        self.batches = batches
        while progress.step < self.total:
            lr = self._step(batches)
            progress.step += 1
            progress.step_in_epoch += 1
            if progress.step_in_epoch == self.steps_per_epoch:
                progress.epoch += 1
                progress.step_in_epoch = 0
            last = progress.step == self.total
            self.logger.step()
            if progress.step % self.tc.log_every_steps == 0 or last:
                self._log(lr)
            if self._eval_due(last):
                self._evaluate_and_save()
            elif (self.tc.checkpoint_every_steps > 0 and progress.step % self.tc.checkpoint_every_steps == 0) or (
                    self.stop_requested and not last):
                self._save(best=False)
            if self.stop_requested and not last:
                raise StoppedBySignal(
                    f"stopped by {self.signalled or 'a signal to another process'} at step {progress.step}; "
                    f"checkpoint {self.last_saved} written: rerun with --resume (train.resume=auto) to continue",
                    self.signalled,
                )
        del batches
        self.batches = None
        if progress.metrics_step != progress.step:  # resumed from an old checkpoint of a finished run
            self._evaluate_and_save()
        if self.main:
            final = {"model": self.model.state_dict()}
            if self.ema is not None:
                final["ema"] = self.ema.module.state_dict()
            ckpt.atomic_save(final, self.out / "final.pt")
            atomic_write_json(self.out / "final_metrics.json", progress.metrics)
        return progress.metrics

    def _build_loader(self) -> DataLoader:
        """One loader, and one iterator of it, for the whole run (see RunSampler): no worker start-up and no empty
        prefetch queue at an epoch start. (Not `persistent_workers`: the loader would then keep its workers alive
        after the run, for as long as anything holds the trainer.)"""
        config = self.config
        workers = config.data.num_workers
        return Loader(
            SeededSamples(self.task.train_set, config.seed),
            batch_size=self.micro, sampler=self.sampler, num_workers=workers, collate_fn=self.task.collate_fn,
            drop_last=True, pin_memory=self.info.device.type == "cuda",
            prefetch_factor=config.data.prefetch_factor if workers > 0 else None,
            # The loader draws its workers' base seed from this generator, not from the global RNG, so creating
            # an iterator mid-epoch on resume leaves the global RNG where the uninterrupted run has it.
            generator=torch.Generator().manual_seed(hash((config.seed, self.info.rank)) % 2**63),
        )

    def _autocast(self):
        device = self.info.device.type
        enabled = self.tc.amp == "bf16" or (self.tc.amp == "auto" and device == "cuda")
        return torch.autocast(device, dtype=torch.bfloat16, enabled=enabled)

    def _step(self, batches) -> float:
        """One optimizer step over grad_accum_steps micro-batches; returns the LR it used."""
        accum = self.tc.grad_accum_steps
        for i in range(accum):
            batch = to_device(next(batches), self.info.device, self.tc.channels_last)
            # DDP averages gradients over ranks only on the last micro-batch; the others accumulate locally.
            sync = self.ddp is None or i == accum - 1
            with nullcontext() if sync else self.ddp.no_sync():
                with self._autocast():
                    try:
                        outputs = self.forward(batch)
                    except ValueError as error:
                        if "Expected more than 1 value per channel" not in str(error):
                            raise
                        raise ConfigError(
                            f"train.batch_size={self.tc.batch_size} leaves {self.micro} sample(s) per process and "
                            "forward pass, and a BatchNorm layer saw one value per channel (a 1x1 feature map): "
                            "give at least 2 samples per process (train.batch_size) or larger images") from None
                loss = outputs["loss"]
                if loss.ndim != 0:
                    raise ValueError(f"the model's 'loss' must be a scalar, got shape {tuple(loss.shape)}")
                (loss / accum).backward()
            self.nonfinite = torch.maximum(self.nonfinite, (~torch.isfinite(loss.detach())).float())
            for key, value in outputs.items():
                if torch.is_tensor(value) and value.ndim == 0:
                    self.sums[key] = self.sums.get(key, 0.0) + value.detach().float()
            self.micro_count += 1
        if self.tc.clip_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.tc.clip_grad_norm)
            # Logged like the model's values, which are summed per micro-batch and divided by their count.
            self.sums["grad_norm"] = self.sums.get("grad_norm", 0.0) + norm.detach().float() * accum
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model, step=self.progress.step + 1)
        return lr

    def _log(self, lr: float) -> None:
        self._check_flags()
        means = {k: v / self.micro_count for k, v in self.sums.items()}
        reduced = all_reduce_sum(torch.stack(list(means.values()))) / self.info.world_size if means else []
        now = time.perf_counter()
        seconds = max(now - self.tic - self.paused, 1e-9)  # evaluation and checkpoint time left out
        record = {"step": self.progress.step, "epoch": round(self.progress.step / self.steps_per_epoch, 4),
                  "lr": lr, **{k: float(v) for k, v in zip(means, reduced)},
                  "images_per_s": round((self.progress.step - self.tic_step) * self.tc.batch_size / seconds, 2)}
        self.logger.train(record)
        self.sums, self.micro_count = {}, 0
        self.tic, self.tic_step, self.paused = now, self.progress.step, 0.0

    def _eval_due(self, last: bool) -> bool:
        tc, progress = self.tc, self.progress
        at_epoch_end = progress.step_in_epoch == 0
        return (last or (tc.eval_every_steps > 0 and progress.step % tc.eval_every_steps == 0)
                or (at_epoch_end and tc.eval_every_epochs > 0 and progress.epoch % tc.eval_every_epochs == 0))

    def _evaluate(self) -> dict:
        target = self.ema.module if self.ema is not None else self.model
        broadcast_buffers(target)
        target.eval()
        with torch.no_grad(), self._autocast():
            metrics = self.task.evaluate(target)
        self.model.train()
        if self.task.primary_metric not in metrics:
            raise ValueError(f"the evaluator returned {sorted(metrics)}, without the primary metric "
                             f"{self.task.primary_metric!r}")
        return {k: float(v) for k, v in metrics.items()}

    def _evaluate_and_save(self) -> None:
        """Checkpoint, evaluate, then checkpoint again with the result (and best.pt when it is the best).

        The first checkpoint keeps the training if the evaluation fails (e.g. a validation file that cannot be
        read at the end of a long run): fix the cause and --resume evaluates this step again.
        """
        progress, name = self.progress, self.task.primary_metric
        self._save(best=False, eval_pending=True)
        started = time.perf_counter()
        try:
            progress.metrics = self._evaluate()
        except UserError as error:
            error.args = (f"{one_line(error)} (evaluating step {progress.step}; the training is saved in "
                          f"{self.last_saved}: fix this and rerun with --resume to evaluate it)",)
            raise
        progress.metrics_step = progress.step
        is_best = progress.best is None or progress.metrics[name] > progress.best
        if is_best:
            progress.best = progress.metrics[name]
        self.logger.eval({"step": progress.step, "epoch": round(progress.step / self.steps_per_epoch, 4),
                          **progress.metrics, f"best_{name}": progress.best})
        self.paused += time.perf_counter() - started
        self._save(best=is_best)

    def _save(self, best: bool, eval_pending: bool = False) -> None:
        self._check_flags()
        started = time.perf_counter()
        progress = self.progress
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": progress.step,
            "epoch": progress.epoch,
            "step_in_epoch": progress.step_in_epoch,
            "batch_size": self.tc.batch_size,
            "best": progress.best,
            "metrics": progress.metrics,
            "metrics_step": progress.metrics_step,
            "eval_pending": eval_pending,
            "rng": all_gather_object(ckpt.rng_state()),
            "config": self.resolved,
        }
        if self.ema is not None:
            state["ema"] = self.ema.module.state_dict()
        path = ckpt.step_path(self.ckpt_dir, progress.step)
        if self.main:
            # best.pt first: the step checkpoint records this result as the best so far, and a run resumed from
            # it never writes best.pt for it again, so a kill between the two files must not leave the step one.
            if best:
                ckpt.atomic_save(state, self.ckpt_dir / "best.pt")
                ckpt.atomic_copy(self.ckpt_dir / "best.pt", path)
            else:
                ckpt.atomic_save(state, path)
            ckpt.prune(self.ckpt_dir, self.tc.keep_last)
        self.last_saved = path
        self.paused += time.perf_counter() - started

    def _check_flags(self) -> None:
        """Agree over ranks on non-finite values (stop with an error) and on a stop signal (sets stop_requested).

        Called before every checkpoint, so no checkpoint ever holds NaN or infinite weights: a step whose loss was
        finite can still make its update infinite (a huge LR), so the weights themselves are checked, not only
        the losses seen since the last check.
        """
        signalled = torch.tensor(float(self.signalled is not None), device=self.info.device)
        flags = torch.stack([self.nonfinite, self._nonfinite_weights(), signalled])
        nonfinite_loss, nonfinite_weights, stop = all_reduce_max(flags).tolist()
        self.stop_requested = self.stop_requested or stop > 0
        if nonfinite_loss > 0 or nonfinite_weights > 0:
            what = "the loss" if nonfinite_loss > 0 else "the weights (after a finite loss)"
            where = (f"the last good checkpoint is {self.last_saved}" if self.last_saved
                     else "no checkpoint was written yet")
            raise NonFiniteLossError(
                f"{what} became NaN or infinite before step {self.progress.step} (epoch {self.progress.epoch}); "
                f"training stopped and {where}. Lower train.lr, raise train.warmup_epochs or set "
                "train.clip_grad_norm"
            )

    def _nonfinite_weights(self) -> torch.Tensor:
        """1.0 when a parameter or buffer of the model (or its EMA) holds NaN or inf, else 0.0; on the device."""
        modules = [self.model] + ([self.ema.module] if self.ema is not None else [])
        tensors = [t for m in modules for t in (*m.parameters(), *m.buffers()) if t.is_floating_point()]
        if not tensors:
            return torch.zeros((), device=self.info.device)
        return (~torch.stack([torch.isfinite(t).all() for t in tensors]).all()).float().to(self.info.device)


def _pick_resume(resume: str | None, ckpt_dir: Path) -> tuple[Path | None, str | None]:
    """(checkpoint to resume from, or None; the reason not to start, or None)."""
    if resume is None and ckpt.step_checkpoints(ckpt_dir):
        return None, (f"{ckpt_dir} holds checkpoints of an earlier run: continue it with train.resume=auto, or "
                      "choose another output_dir")
    try:
        return ckpt.find_resume(resume, ckpt_dir), None
    except ckpt.CheckpointError as error:
        return None, str(error)


def _restore(path, config, info, model, ema, optimizer, scheduler) -> Progress:
    state = ckpt.load_training(path)
    if state["batch_size"] != config.train.batch_size:
        raise ckpt.CheckpointError(
            f"checkpoint {path} was trained with train.batch_size={state['batch_size']}, this run has "
            f"{config.train.batch_size}: resuming needs the same global batch"
        )
    if isinstance(state.get("config"), dict):
        check_resumable(state["config"], to_dict(config), path)
    if ema is not None and "ema" not in state:
        raise ckpt.CheckpointError(f"checkpoint {path} has no EMA weights but train.ema_decay is set")
    try:
        model.load_state_dict(state["model"])
        if ema is not None:
            ema.module.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    except (RuntimeError, ValueError, KeyError) as error:
        raise ckpt.CheckpointError(f"checkpoint {path} does not fit this run's model: {one_line(error)}") from None
    rngs = state["rng"]
    if len(rngs) == info.world_size:
        ckpt.set_rng_state(rngs[info.rank])
    else:
        log.warning("checkpoint %s was written by %d processes, this run has %d: random streams are re-seeded, "
                    "so augmentations differ from an uninterrupted run", path, len(rngs), info.world_size)
        seed_everything(config.seed + info.rank + 1_000_003 * state["step"])
    fallback_step = state["step"] if state["metrics"] else -1  # checkpoints written before metrics_step existed
    return Progress(step=state["step"], epoch=state["epoch"], step_in_epoch=state["step_in_epoch"],
                    best=state["best"], metrics=state["metrics"],
                    metrics_step=state.get("metrics_step", fallback_step), eval_pending=state.get("eval_pending", False))


def check_resumable(saved: dict, current: dict, path) -> None:
    """Refuse a resume whose config differs from the checkpoint's in a key that changes the run.

    Raises CheckpointError listing every such key with both values (checked before anything is written).
    """
    changed = run_differences(saved, current, RESUME_MAY_CHANGE)
    if changed:
        raise ckpt.CheckpointError(
            f"cannot resume from {path}: the config changed ({'; '.join(changed)}). These change the run: a "
            "resumed run would mix two configs (and the restored optimiser state and schedule override lr, "
            "momentum and weight_decay). Put them back, or start a new run in another output_dir (model.weights=... "
            "starts from the checkpoint's weights)"
        )
    for key in ("train.steps", "train.epochs"):
        old, new = flatten(saved).get(key), flatten(current).get(key)
        if old != new:
            log.warning("resuming with %s=%s (the checkpoint's run had %s): the LR schedule now spans the new length",
                        key, new, old)


def _prepare_output(config: RunConfig, out: Path, ckpt_dir: Path) -> None:
    """Rank 0: the run folder with config.yaml; temp files of killed writers removed. One error if unwritable."""
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create output_dir {out}: {error.strerror or error}") from None
    save_config(config, out)
    for folder in (out, ckpt_dir):
        for path in remove_stale_temp_files(folder):
            log.info("removed %s, left by a writer that was killed", path)


def to_channels_last(model: nn.Module) -> None:
    """Channels-last weights: 4-D (2-D convs) as channels_last, 5-D (3-D convs) as channels_last_3d."""
    for module in model.modules():
        dims = {p.ndim for p in module.parameters(recurse=False)}
        if dims == {4} or dims == {4, 1}:
            module.to(memory_format=torch.channels_last)
        elif dims == {5} or dims == {5, 1}:
            module.to(memory_format=torch.channels_last_3d)


def to_device(batch, device: torch.device, channels_last: bool = False):
    """Tensors anywhere in lists, tuples and dicts moved to `device`; images (4-D/5-D float or uint8) made
    channels-last (a model's Normalize keeps that format for the float images it makes)."""
    if torch.is_tensor(batch):
        batch = batch.to(device, non_blocking=True)
        if channels_last and (batch.is_floating_point() or batch.dtype == torch.uint8) and batch.ndim in (4, 5):
            batch = batch.contiguous(
                memory_format=torch.channels_last if batch.ndim == 4 else torch.channels_last_3d)
        return batch
    if isinstance(batch, dict):
        return {k: to_device(v, device, channels_last) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        moved = [to_device(v, device, channels_last) for v in batch]
        return type(batch)(*moved) if hasattr(batch, "_fields") else type(batch)(moved)
    return batch


class RunLogger:
    """Rank 0's outputs: OUTPUT_DIR/metrics.jsonl (one JSON object per event), TensorBoard, and progress.

    The progress bar shows on a terminal only; elsewhere (SLURM logs, tests) each train event is one log line.
    On resume, events after the checkpoint's step (written by the killed run) are dropped from metrics.jsonl.
    """

    def __init__(self, out: Path, enabled: bool, total: int, start_step: int, resumed: bool):
        self.enabled = enabled
        self.bar = None
        self.writer = None
        if not enabled:
            return
        self.path = out / "metrics.jsonl"
        if resumed and self.path.exists():
            kept = [line for line in _readable_events(self.path) if json.loads(line).get("step", 0) <= start_step]
            _write_lines(self.path, kept)
        elif not resumed:
            self.path.write_text("")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=start_step if resumed else None)
        self.start = time.perf_counter()
        self.start_step = start_step
        self.total = total
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start_step, unit="step", dynamic_ncols=True)

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def _write(self, kind: str, record: dict) -> None:
        self._append({"kind": kind, **record})
        for key, value in record.items():
            if key not in ("step", "epoch"):
                self.writer.add_scalar(f"{kind}/{key}", value, record["step"])

    def train(self, record: dict) -> None:
        if not self.enabled:
            return
        self._write("train", record)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record.get('loss', math.nan):.4f}", lr=f"{record['lr']:.3g}",
                                 img_s=f"{record['images_per_s']:.0f}")
        else:
            done = record["step"] - self.start_step
            elapsed = time.perf_counter() - self.start
            eta = elapsed / max(done, 1) * (self.total - record["step"])
            log.info("step %d/%d epoch %.2f loss %.4f lr %.4g %.1f img/s eta %s", record["step"], self.total,
                     record["epoch"], record.get("loss", math.nan), record["lr"], record["images_per_s"],
                     f"{int(eta // 3600)}:{int(eta % 3600 // 60):02d}:{int(eta % 60):02d}")

    def eval(self, record: dict) -> None:
        if not self.enabled:
            return
        self._write("eval", record)
        message = " ".join(f"{k} {v:.4f}" for k, v in record.items() if k not in ("step", "epoch"))
        (self.bar.write if self.bar is not None else log.info)(f"eval at step {record['step']}: {message}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def _append(self, record: dict) -> None:
        line = to_json(record, where=str(self.path)) + "\n"
        try:
            with open(self.path, "a") as f:
                f.write(line)
        except OSError as error:
            raise UserError(f"cannot write {self.path}: {error.strerror or error}") from None


def _readable_events(path: Path) -> list[str]:
    """The lines of metrics.jsonl that parse; a line torn by a kill mid-write (the last one) is dropped."""
    lines = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s line %d is not a complete JSON record (a write cut short by a kill): dropped", path,
                        number)
            continue
        lines.append(line)
    return lines


def _write_lines(path: Path, lines: list[str]) -> None:
    atomic_write_text(path, "".join(line + "\n" for line in lines))
