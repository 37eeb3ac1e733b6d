"""The one training loop: every task (pretraining, the transfer tasks, video) runs through `train`.

The loop knows nothing about the task (see task.py): it moves batches to the device, calls the model under the
run's autocast (train.amp, resolved by device.resolve_amp), steps the optimizer (through a GradScaler in fp16) and
the LR schedule on the global step, keeps the EMA, evaluates, checkpoints and logs; at the end it writes
final.pt (the whole model), weights.pth (the network to export), final_metrics.json and summary.json (metric,
best step, wall time, images/s; also logged as a table, see summary.py). The same code runs as
one process or as many under torchrun/SLURM (DDP; see distributed.py). It also owns the checks that stop a run:
non-finite losses or weights (NonFiniteLossError) and stop signals, agreed over ranks.

The mechanics it drives live beside it: the data order and per-sample seeding in sampling.py, checkpoint
contents, resume and the run folder in resume.py (files in checkpoint.py), metrics.jsonl/TensorBoard/progress
in run_log.py, batches to the device in device.py.

Exact resume: the data order of an epoch is a function of (seed, epoch) alone (RunSampler), a
checkpoint stores the position inside the epoch and every rank's RNG states, and the LR is a function of the
step. A run killed and resumed therefore continues with the same batches, the same random augmentations (in the
main process the checkpoint restores the generators; in worker processes each sample seeds them from (seed,
epoch, index), see SeededSamples) and the same updates; on CPU the final weights are bitwise those of an
uninterrupted run (tests/test_engine_resume.py).
"""

import inspect
import logging
import math
import os
import signal
import sys
import time
import uuid
import warnings
from contextlib import ExitStack, nullcontext
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, IterableDataset

from rs_transfer.config import ConfigError, RunConfig, to_dict
from rs_transfer.engine import checkpoint as ckpt
from rs_transfer.engine import resume
from rs_transfer.engine.device import autocast, resolve_amp, to_channels_last, to_device
from rs_transfer.engine.distributed import (
    StepFlags,
    all_reduce_max,
    all_reduce_sum,
    barrier,
    broadcast_buffers,
    broadcast_object,
    claimed_folder,
    cpu_threads,
    elastic_restart,
    init_distributed,
    loader_workers,
    local_processes,
    seed_everything,
)
from rs_transfer.engine.ema import Ema
from rs_transfer.engine.freeze import freeze
from rs_transfer.engine.loader import Loader, stop_signals_handled, stop_signals_recorded
from rs_transfer.engine.optim import base_lr, build_optimizer, build_scheduler, describe
from rs_transfer.engine.run_log import RunLogger
from rs_transfer.engine.sampling import RunSampler, SeededSamples
from rs_transfer.engine.summary import format_count, format_summary, run_summary, write_summary
from rs_transfer.engine.task import Task, exported_network
from rs_transfer.engine.trackers import check_installed
from rs_transfer.errors import StoppedBySignal, UserError, one_line
from rs_transfer.files import atomic_write_json

log = logging.getLogger(__name__)


class NonFiniteLossError(UserError):
    pass


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
    # `held` keeps output_dir's lock (rank 0) for the run's life, released when this returns or raises.
    with stop_signals_recorded() as received, ExitStack() as held:
        trainer = Trainer(config, task, held)
        trainer.signalled = received.signalled
        return trainer.run()


# torch >= 2.13 calls it forward_sync_buffers and warns (FutureWarning) for the older broadcast_buffers, which the
# versions pyproject.toml allows below it still need. Either way buffers match at the start: every rank built the
# same model from the same seed or checkpoint.
NO_FORWARD_BUFFER_SYNC = ({"forward_sync_buffers": False}
                          if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                          else {"broadcast_buffers": False})

class Trainer:
    """One run: set up in __init__ (devices, model, data, optimizer, resume), then `run()` is the loop."""

    def __init__(self, config: RunConfig, task: Task, held: ExitStack):
        self.config, self.task, self.tc = config, task, config.train
        # The order matters: requests are checked before devices start, the resume is picked before the model is
        # touched, the model is frozen and placed before the optimizer and DDP see it, and the run's config.yaml
        # is written only once the resume is accepted.
        self._check_request()
        self._start_processes()
        resume_from = self._claim_output(held)
        frozen = self._place_model()
        self._build_data()
        self._build_optimizer(frozen)
        self._resume(resume_from)
        self._wrap_model()
        self._start_logging(resume_from)

    def _check_request(self):
        """What the config and task ask for that no run can do, refused before any device or process starts."""
        tc, task = self.tc, self.task
        if (tc.epochs is None) == (tc.steps is None):
            raise ConfigError("give exactly one of train.epochs and train.steps")
        check_installed(tc.loggers)  # a missing tracker package: one error line before devices, resume and the first step
        if isinstance(task.train_set, IterableDataset):
            raise TypeError("task.train_set must be a map-style Dataset (indexable): the engine shards, shuffles "
                            "and resumes it by index")

    def _start_processes(self):
        """The device and process group, the per-process batch, precision, CPU threads, loader workers and seeds."""
        tc, config = self.tc, self.config
        info = self.info = init_distributed(tc.device)
        self.micro = micro_batch_size(tc.batch_size, info.world_size, tc.grad_accum_steps)
        self.main = info.rank == 0
        self.precision, self.precision_why = resolve_amp(tc.amp, info.device)
        if info.device.type == "cpu":
            self.threads = cpu_threads(local_processes())  # the node's processes, as loader_workers counts them
            torch.set_num_threads(self.threads[0])
        self.workers = loader_workers(config.data.num_workers)
        seed_everything(config.seed + info.rank)

    def _claim_output(self, held: ExitStack):
        """Lock output_dir for this run and return the checkpoint to resume from (None: a fresh start)."""
        config = self.config
        self.resolved = to_dict(config)
        self.out = Path(config.output_dir)
        self.ckpt_dir = self.out / "checkpoints"
        # One live run per output_dir (two would mix their logs and checkpoints): rank 0 holds its lock to the end.
        held.enter_context(claimed_folder(self.out, "output_dir"))
        # Rank 0 picks the checkpoint and tells the others, so all ranks resume from one file (or all stop).
        resume_from, problem = broadcast_object(resume.pick_resume(self._resume_mode(), self.ckpt_dir)
                                                if self.main else None)
        if problem:
            raise ckpt.CheckpointError(problem)
        return resume_from

    def _place_model(self):
        """Freeze, convert, move and format the task's model, and start its EMA; return what freeze() froze."""
        tc, config, info = self.tc, self.config, self.info
        model = self.model = self.task.model
        # Before SyncBatchNorm, the EMA copy, the optimizer and DDP: frozen BN must not become SyncBatchNorm, and
        # frozen parameters must be in none of them.
        frozen = freeze(model, config.model.freeze_stages, config.model.freeze_bn)
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
        return frozen

    def _build_data(self):
        """The sampler and training loader, and the run's length in steps (per epoch and in all)."""
        tc, task, info = self.tc, self.task, self.info
        self.sampler = RunSampler(task.train_set, num_replicas=info.world_size, rank=info.rank, seed=self.config.seed)
        self.loader = (self._build_loader() if task.make_loader is None
                       else task.make_loader(self.sampler, self.micro, info.device))
        self.steps_per_epoch = self.sampler.num_samples // (self.micro * tc.grad_accum_steps)
        if self.steps_per_epoch == 0:
            raise ConfigError(f"the training set has {len(task.train_set)} samples, fewer than one step of "
                              f"train.batch_size={tc.batch_size}")
        self.sampler.samples_per_epoch = self.steps_per_epoch * self.micro * tc.grad_accum_steps
        self.total = tc.steps if tc.steps is not None else tc.epochs * self.steps_per_epoch

    def _build_optimizer(self, frozen):
        """The optimizer over the trainable parameters, its LR schedule and the fp16 gradient scaler."""
        tc = self.tc
        self.optimizer = build_optimizer(self.model, tc)
        if self.main:
            log.info("%s", describe(self.optimizer, tc.optimizer, frozen))
        self.scheduler = build_scheduler(self.optimizer, tc, self.total, self.steps_per_epoch)
        # fp16 only (torch.amp docs, "Gradient Scaling"): its 5-bit exponent flushes small gradients to zero, so the
        # loss is scaled up, and a step whose gradients overflow is skipped. bf16 has float32's range. A disabled
        # scaler passes everything through, so bf16 and float32 runs take exactly the steps they took without it.
        self.scaler = torch.amp.GradScaler(self.info.device.type, enabled=self.precision == "fp16")
        self.optimizer.register_step_post_hook(self._note_optimizer_step)
        self.optimizer_stepped = False  # set by the hook: the scaler called optimizer.step (did not skip it)
        self.amp_skipped = 0  # optimizer steps the scaler skipped since the last log event

    def _resume(self, resume_from):
        """Restore the checkpoint's state (if any), start the checkpoint writer and prepare the run folder."""
        self.progress = resume.Progress()
        if resume_from is not None:
            self.progress = resume.restore(resume_from, self.config, self.info, self.model, self.ema, self.optimizer,
                                           self.scheduler, self.scaler)
            if self.main:
                log.info("resumed from %s at step %d (epoch %d, step %d in it)", resume_from, self.progress.step,
                         self.progress.epoch, self.progress.step_in_epoch)
        if self.progress.step > self.total:
            raise ConfigError(f"the run is {self.total} steps long (train.steps / train.epochs), but checkpoint "
                              f"{resume_from} is at step {self.progress.step}: it cannot continue from there")
        self.last_saved = resume_from
        self.last_written = resume_from  # rank 0: the newest checkpoint whose background write has completed
        # Rank 0 writes checkpoints in a background thread (one in flight at a time); the other ranks write none
        # and never wait for it: they go on training (see _save).
        self.writer = ckpt.BackgroundWriter() if self.main else None
        if self.main:  # only once the resume is accepted: a refused one leaves the run's config.yaml as it was
            resume.prepare_output(self.config, self.out, self.ckpt_dir)

    def _wrap_model(self):
        """`self.forward`: the model in DDP when there are several processes, compiled when train.compile."""
        tc, info = self.tc, self.info
        self.ddp = None
        if info.world_size > 1:
            device_ids = [info.device.index] if info.device.type == "cuda" else None
            # gradient_as_bucket_view: gradients live in DDP's buckets, not a copy of them (less memory, no copy per
            # step). No buffer sync per forward: training-mode BN uses batch statistics, so rank 0's running
            # statistics need not be sent before every forward; the evaluated model's buffers are broadcast before
            # each evaluation (`_evaluate`) and checkpoints hold rank 0's.
            self.ddp = DistributedDataParallel(self.model, device_ids=device_ids,
                                               find_unused_parameters=tc.find_unused_parameters,
                                               gradient_as_bucket_view=True, **NO_FORWARD_BUFFER_SYNC)
        wrapped = self.ddp or self.model
        self.forward = torch.compile(wrapped, backend=tc.compile_backend) if tc.compile else wrapped

    def _start_logging(self, resume_from):
        """The run log and trackers, the loop's flags, sums and clocks; rank 0 then says what the run will do."""
        self.logger = RunLogger(self.out, enabled=self.main, total=self.total, start_step=self.progress.step,
                                resumed=resume_from is not None, eval_pending=self.progress.eval_pending,
                                samples=self.task.sample_unit,
                                loggers=tuple(self.tc.loggers), config=self.resolved)
        # Non-finite losses are flagged on the device and checked at log events and before checkpoints: no GPU
        # sync per step, and no checkpoint ever holds the weights of a diverged run.
        self.nonfinite = torch.zeros((), device=self.info.device)
        self.signalled: str | None = None  # the name of a stop signal this process received
        self.stop_requested = False  # some process received one (agreed over ranks after every step)
        # The model's logged values summed over micro-batches (grad_norm over the steps the optimizer took), and
        # how many went into each sum: a log event's value is their mean.
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.tic, self.tic_step, self.paused = time.perf_counter(), self.progress.step, 0.0
        # This segment's clock (a resumed run adds it to the checkpoint's times, see _clock): started here, and
        # the seconds of it spent evaluating and writing checkpoints.
        self.segment_start, self.segment_paused = self.tic, 0.0
        self.clock_base = (self.progress.wall_s, self.progress.train_s)
        self.flags = StepFlags()  # stop signals, agreed over ranks at every step
        self.last_line = self.tic  # when rank 0 last printed a log or progress line
        if self.main:
            log.info("%s", self._start_block())

    def _start_block(self) -> str:
        """What the run is about to do, said before its first step: device, processes and threads, versions,
        model, data, plan and output folder (timm and detectron2 log the like)."""
        info, tc, model = self.info, self.tc, self.model
        if info.device.type == "cuda":
            device = f"{torch.cuda.get_device_name(info.device)} (CUDA {torch.version.cuda})"
        else:
            device = f"CPU, {self.threads[0]} thread(s) per process ({self.threads[1]})"
        params = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        classes = getattr(self.config.model, "num_classes", None)
        epochs = self.total / self.steps_per_epoch
        # only the schedules that fall inside this run (a 20-step try of a 10k-step recipe evaluates at the end only)
        evaluation = ", ".join(
            [f"every {tc.eval_every_epochs} epoch(s)"] * (0 < tc.eval_every_epochs < epochs)
            + [f"every epoch of the last {tc.eval_last_epochs}"] * (tc.eval_last_epochs > 0 and epochs > 1)
            + [f"every {tc.eval_every_steps} steps"] * (0 < tc.eval_every_steps < self.total) + ["at the end"])
        lines = [
            f"device: {device}; {info.world_size} process(es); torch {torch.__version__}; amp: {self.precision} "
            f"({self.precision_why})",
            f"model: {self.config.model.name}, {params / 1e6:.2f}M parameters"
            + (f" ({(params - trainable) / 1e6:.2f}M frozen)" if trainable < params else "")
            + (f", {classes} classes" if classes else ""),
            f"data: {len(self.task.train_set)} training samples, {self.steps_per_epoch} "
            f"step{'s' * (self.steps_per_epoch != 1)} per epoch, "
            f"{self.workers[0]} loader worker(s) per process ({self.workers[1]})",
            f"plan: {self.total} steps ({format_count(epochs)} epochs) of global batch {tc.batch_size} ({self.micro} "
            f"per process x {info.world_size} process(es) x {tc.grad_accum_steps} accumulation), "
            f"from step {self.progress.step}; evaluation {evaluation}; a log line every {tc.log_every_steps} steps, "
            f"a progress line at least every {tc.log_every_seconds:g} s",
            f"output: {self.out.resolve()}",
        ]
        return "start:\n  " + "\n  ".join(lines)

    def _resume_mode(self) -> str | None:
        """train.resume, or "auto" in a worker group torchrun restarted (`--max-restarts`): the group it replaces
        left checkpoints in this output_dir, and a restart must continue from them, not refuse them."""
        restarts = elastic_restart()
        if self.tc.resume is None and restarts > 0:
            log.info("torchrun restart %d: resuming from the newest checkpoint in %s, if any", restarts, self.ckpt_dir)
            return "auto"
        return self.tc.resume

    def run(self) -> dict:
        # SLURM sends SIGTERM (or the --signal of the job script, e.g. USR1) before it stops a job; torchrun passes
        # SIGTERM on; Ctrl-C sends SIGINT. The run then checkpoints at the end of the step and stops with a message
        # saying how to resume (a second Ctrl-C quits at once).
        with stop_signals_handled(self._on_signal):
            try:
                return self._run()
            except BaseException:
                self._wait_writes(quiet=True)  # the checkpoints on disk are whole before the error goes up
                raise
            finally:
                self.flags.close()
                self._stop_workers()
                self._close_evaluators()
                self.logger.close()

    def _stop_workers(self) -> None:
        """Shut the loader's workers down now, also when the run fails: left to the iterator's garbage collection
        at exit, after engine.loader has killed them, it prints a second traceback under the error line."""
        shutdown = getattr(getattr(self, "batches", None), "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        self.batches = None

    def _close_evaluators(self) -> None:
        """Shut down what evaluators keep between evaluations (an evaluator with a `close()`: TopKEvaluator's
        persistent loader workers), also when the run fails."""
        for evaluate in {id(f): f for f in (self.task.evaluate, self.task.report) if f is not None}.values():
            close = getattr(evaluate, "close", None)
            if callable(close):
                close()

    def _on_signal(self, number, frame) -> None:
        if number == signal.SIGINT:
            if self.signalled == "SIGINT":
                # At once and in one line: unwinding through the loader's workers took up to 85 s and printed
                # a 30-line traceback. The checkpoints on disk are whole (atomic writes).
                # Not waiting for a background write in flight (that could take seconds): the last checkpoint
                # named is the last one whose write completed; an abandoned temp file is removed at the next start.
                print(f"stopped: Ctrl-C twice: quit without a checkpoint of this step (the last one: "
                      f"{self.last_written or 'none yet'})", file=sys.stderr, flush=True)
                os._exit(128 + signal.SIGINT)
            log.warning("Ctrl-C: stopping after a checkpoint at the end of this step; Ctrl-C again quits at once")
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
        first = progress.step + 1  # a progress line at once: a run never starts in silence
        while progress.step < self.total:
            lr = self._step(batches)
            progress.step += 1
            progress.step_in_epoch += 1
            if progress.step_in_epoch == self.steps_per_epoch:
                progress.epoch += 1
                progress.step_in_epoch = 0
            last = progress.step == self.total
            self.logger.step()
            # A stop signal acts at the next step boundary, not the next log event (which can be minutes away),
            # agreed over ranks so that all of them stop at the same step.
            self.stop_requested = self.flags.agree([float(self.signalled is not None)])[0] > 0 or self.stop_requested
            if progress.step % self.tc.log_every_steps == 0 or last:
                self._log(lr)
            elif self.main and (progress.step == first or
                                time.perf_counter() - self.last_line >= self.tc.log_every_seconds):
                self._progress(lr)  # a run never starts in silence nor goes quiet for long
            if progress.step == first:
                self._warn_if_long()
            if self._eval_due(last):
                self._evaluate_and_save()
            elif (self.tc.checkpoint_every_steps > 0 and progress.step % self.tc.checkpoint_every_steps == 0) or (
                    self.stop_requested and not last):
                self._save()
            if self.stop_requested and not last:
                self._wait_writes()  # the checkpoint the message names is on disk (or its write error is raised)
                raise StoppedBySignal(
                    f"{self.signalled or 'a signal to another process'} at step {progress.step}; "
                    f"checkpoint {self.last_saved} written: rerun with --resume (train.resume=auto) to continue",
                    self.signalled,
                )
        del batches
        self.batches = None
        if progress.metrics_step != progress.step:  # resumed from an old checkpoint of a finished run
            self._evaluate_and_save()
        self._wait_writes()  # the last checkpoint, best.pt and their records are on disk before the final files
        if self.tc.report_best:  # early stopping: the run ends as its best checkpoint
            progress.metrics = self._report_best()
        self._clock()  # the run's time ends with its last evaluation, before the final files are written
        if self.main:
            final = {"model": self.model.state_dict()}
            if self.ema is not None:
                final["ema"] = self.ema.module.state_dict()
            ckpt.atomic_save(final, self.out / "final.pt")
            self._export()
            atomic_write_json(self.out / "final_metrics.json", progress.metrics)
            self._summarize()
        return progress.metrics

    def _summarize(self) -> None:
        """Rank 0: OUTPUT_DIR/summary.json and the same numbers as a table in the log."""
        progress = self.progress
        summary = run_summary(self.out, self.task.primary_metric, progress.metrics, progress.best,
                              progress.best_step, progress.step, self.tc.batch_size, progress.wall_s, progress.train_s,
                              family=self.task.family, task=self.task.name)
        write_summary(self.out, summary)
        self.logger.final(progress.metrics, summary, progress.step)
        log.info("run summary:\n%s", format_summary(summary, self.task.sample_unit))

    def _clock(self) -> None:
        """Bring progress.wall_s and progress.train_s up to now: the checkpoint's times plus this segment's."""
        elapsed = time.perf_counter() - self.segment_start
        wall, training = self.clock_base
        self.progress.wall_s = wall + elapsed
        self.progress.train_s = training + elapsed - self.segment_paused

    def _pause(self, started: float) -> None:
        """Leave the time since `started` (an evaluation, a checkpoint write) out of training time and images/s."""
        seconds = time.perf_counter() - started
        self.paused += seconds
        self.segment_paused += seconds

    def _export(self) -> None:
        """Rank 0: OUTPUT_DIR/weights.pth, the network alone (task.py's `model.net`; the EMA weights when the run
        keeps an EMA, as they are the ones evaluated), with the zoo's key names: what fine-tuning and
        `create_model(..., weights=...)` load."""
        ckpt.atomic_save(exported_network(self.evaluated).state_dict(), self.out / "weights.pth")
        log.info("network weights (for fine-tuning): %s", self.out / "weights.pth")

    def _build_loader(self) -> DataLoader:
        """One loader, and one iterator of it, for the whole run (see RunSampler): no worker start-up and no empty
        prefetch queue at an epoch start. (Not `persistent_workers`: the loader would then keep its workers alive
        after the run, for as long as anything holds the trainer.)"""
        config = self.config
        workers = self.workers[0]
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
        return autocast(self.precision, self.info.device)

    def _add(self, key: str, value: torch.Tensor) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + value.detach().float()
        self.counts[key] = self.counts.get(key, 0) + 1

    def _note_optimizer_step(self, optimizer, args, kwargs) -> None:
        self.optimizer_stepped = True

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
                self.scaler.scale(loss / accum).backward()  # fp16: scaled up, so small gradients stay nonzero
            self.nonfinite = torch.maximum(self.nonfinite, (~torch.isfinite(loss.detach())).float())
            for key, value in outputs.items():
                if torch.is_tensor(value) and value.ndim == 0:
                    self._add(key, value)
        norm = None
        if self.tc.clip_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.tc.clip_grad_norm)
        self.optimizer_stepped = False
        self.scaler.step(self.optimizer)  # fp16: skipped (no update) when a gradient is inf or NaN
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        skipped = not self.optimizer_stepped
        # A skipped step's norm is inf or NaN, not a value to average. Every rank skips the same steps (DDP averages
        # the gradients, so an overflow on one rank is one on all): all ranks log the same keys.
        if norm is not None and not skipped:
            self._add("grad_norm", norm)
        lr = base_lr(self.optimizer)
        self._step_schedule(skipped)
        if self.ema is not None:
            self.ema.update(self.model, step=self.progress.step + 1)
        return lr

    def _step_schedule(self, skipped: bool) -> None:
        """Advance the LR schedule by one step, also past a step the fp16 scaler skipped: the LR stays a function of
        the step, as the schedule and exact resume assume. PyTorch warns ("Detected call of lr_scheduler.step()
        before optimizer.step()") when a scheduler's first step comes before any optimizer step: that is a
        skipped first fp16 step (the first loss scale, 2^16, often overflows), not the call order it warns about."""
        if not skipped:
            self.scheduler.step()
            return
        self.amp_skipped += 1
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`",
                                    UserWarning)
            self.scheduler.step()

    def _amp_record(self) -> dict:
        """fp16 runs: the steps the scaler skipped since the last log event and its loss scale now (the same on every
        rank: DDP averages the gradients, so an overflow on one rank is an overflow on all)."""
        if not self.scaler.is_enabled():
            return {}
        scale = self.scaler.get_scale()
        if scale < 1 and self.amp_skipped and self.main:
            log.warning("fp16: %d step(s) skipped since the last log event and the loss scale fell to %g: gradients "
                        "overflow float16 even unscaled, and such steps make no update; train.amp=bf16 or none "
                        "avoids this", self.amp_skipped, scale)
        record, self.amp_skipped = {"amp_skipped": self.amp_skipped, "loss_scale": scale}, 0
        return record

    def _progress(self, lr: float) -> None:
        """Rank 0's progress line between log events (RunLogger.progress): no collective, no record."""
        loss = self.sums.get("loss")
        self.logger.progress(self.progress.step, float(loss / self.counts["loss"]) if loss is not None else math.nan,
                             lr)
        self.last_line = time.perf_counter()

    def _warn_if_long(self) -> None:
        """After the first step: a run that would take more than a day here (a GPU-sized config on a CPU, say) is
        said so once, with the time it would take and where the small configs are."""
        per_step = time.perf_counter() - self.segment_start  # this segment's first step, the loader's start included
        hours = per_step * (self.total - self.progress.step) / 3600
        if self.main and hours > 24:
            log.warning("at %.1f s per step on %s this run needs about %.0f hours: for a try on this machine use a "
                        "demo config (--config downstream/<task>_demo.yaml, pretrain/demo.yaml, video/demo.yaml) or "
                        "fewer train.steps", per_step, self.info.device.type.upper(), hours)

    def _log(self, lr: float) -> None:
        self._check_flags()
        means = {k: v / self.counts[k] for k, v in self.sums.items()}
        reduced = all_reduce_sum(torch.stack(list(means.values()))) / self.info.world_size if means else []
        now = time.perf_counter()
        seconds = max(now - self.tic - self.paused, 1e-9)  # evaluation and checkpoint time left out
        record = {"step": self.progress.step, "epoch": round(self.progress.step / self.steps_per_epoch, 4),
                  "lr": lr, **{k: float(v) for k, v in zip(means, reduced)}, **self._amp_record(),
                  "images_per_s": round((self.progress.step - self.tic_step) * self.tc.batch_size / seconds, 2)}
        self.logger.train(record)
        self.sums, self.counts = {}, {}
        self.tic, self.tic_step, self.paused = now, self.progress.step, 0.0
        self.last_line = now

    def _eval_due(self, last: bool) -> bool:
        tc, progress = self.tc, self.progress
        at_epoch_end = progress.step_in_epoch == 0
        # train.eval_last_epochs: the epoch ends within the last N epochs' worth of steps of the run
        in_last_epochs = self.total - progress.step < tc.eval_last_epochs * self.steps_per_epoch
        return (last or (tc.eval_every_steps > 0 and progress.step % tc.eval_every_steps == 0)
                or (at_epoch_end and tc.eval_every_epochs > 0 and progress.epoch % tc.eval_every_epochs == 0)
                or (at_epoch_end and in_last_epochs))

    @property
    def evaluated(self) -> nn.Module:
        """The model that is evaluated, visualised and exported: the EMA copy when the run keeps one."""
        return self.ema.module if self.ema is not None else self.model

    def _in_eval_mode(self, call):
        """call(self.evaluated) in eval mode, under no_grad and the run's autocast; back to training mode after.

        The random generators (torch, CUDA, NumPy, Python) are put back as they were before the call: an evaluator
        may draw from them (a DataLoader draws its workers' base seed), and the checkpoint of an evaluated step is
        written before its evaluation, so training must go on from the same states whether or not the evaluation
        ran in this process (a resumed run skips an evaluation its record says is done)."""
        rngs = ckpt.rng_state()
        self.evaluated.eval()
        try:
            with torch.no_grad(), self._autocast():
                result = call(self.evaluated)
        finally:
            ckpt.set_rng_state(rngs)
        self.model.train()
        return result

    def _evaluate(self, evaluate=None) -> dict:
        broadcast_buffers(self.evaluated)
        metrics = self._in_eval_mode(evaluate or self.task.evaluate)
        if self.task.primary_metric not in metrics:
            raise ValueError(f"the evaluator returned {sorted(metrics)}, without the primary metric "
                             f"{self.task.primary_metric!r}")
        return {k: float(v) for k, v in metrics.items()}

    def _visualize(self) -> None:
        """Task.visualize's pictures to TensorBoard, main rank only (the other ranks go on to the next step)."""
        if not (self.main and self.task.visualize is not None):
            return
        self.logger.images(self.progress.step, self._in_eval_mode(self.task.visualize))

    def _evaluate_and_save(self) -> None:
        """Checkpoint, evaluate, then record the result beside the checkpoint (and make best.pt that file when it
        is the best): one checkpoint write per evaluation, in the background while the evaluation runs.

        The checkpoint is written with eval_pending=True before the evaluation, so a failed or killed evaluation
        (e.g. a validation file that cannot be read at the end of a long run) keeps the training: fix the cause and
        --resume evaluates this step again. The result is a small record written after the evaluation was logged
        (checkpoint.record_evaluation); checkpoint.load puts it into the state, so a checkpoint whose record exists
        resumes as evaluated and the evaluation is neither repeated nor logged twice.
        """
        progress, name = self.progress, self.task.primary_metric
        write_id = self._save(eval_pending=True)
        path = self.last_saved
        started = time.perf_counter()
        try:
            progress.metrics = self._evaluate()
        except UserError as error:
            self._wait_writes()  # the file the message names is written (or its own error is raised instead)
            error.args = (f"{one_line(error)} (evaluating step {progress.step}; the training is saved in "
                          f"{self.last_saved}: fix this and rerun with --resume to evaluate it)",)
            raise
        progress.metrics_step = progress.step
        is_best = progress.best is None or progress.metrics[name] > progress.best
        if is_best:
            progress.best, progress.best_step = progress.metrics[name], progress.step
        self.logger.eval({"step": progress.step, "epoch": round(progress.step / self.steps_per_epoch, 4),
                          **progress.metrics, f"best_{name}": progress.best})
        self._visualize()
        if self.main:
            record = {"write_id": write_id, "best": progress.best, "best_step": progress.best_step,
                      "metrics": progress.metrics, "metrics_step": progress.metrics_step}
            self.writer.submit(lambda: ckpt.record_evaluation(path, record, is_best))
        self._pause(started)

    def _report_best(self) -> dict:
        """train.report_best: put best.pt's weights (and EMA) back into the model, so that final.pt and weights.pth
        are the best checkpoint's, and return their evaluation by `task.report` (`task.evaluate` without one).
        Raises CheckpointError (naming the file) when best.pt is missing or unreadable."""
        self._wait_writes()
        barrier()  # rank 0 may still be writing best.pt; every rank then reads it, as on resume
        path = self.ckpt_dir / "best.pt"
        state = ckpt.load(path)
        self.model.load_state_dict(state["model"])
        if self.ema is not None:
            self.ema.module.load_state_dict(state["ema"])
        metrics = self._evaluate(self.task.report)
        if self.main:
            name = self.task.primary_metric
            log.info("train.report_best: %s is step %d (%s %.4f); reported: %s", path, state["step"], name,
                     state["best"], " ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        return metrics

    def _save(self, eval_pending: bool = False) -> str:
        """Checkpoint this step: every rank gathers the state (the RNG states are a collective); rank 0 waits for
        its previous write (one in flight at most, so at most one extra copy of the state in host memory), copies
        the state to host memory and writes it in the background (checkpoint.BackgroundWriter). Returns the
        checkpoint's write_id, which its evaluation record names."""
        self._check_flags()
        started = time.perf_counter()
        self._clock()
        write_id = uuid.uuid4().hex  # os.urandom: no run RNG is drawn from
        state = resume.training_state(self.model, self.ema, self.optimizer, self.scheduler, self.scaler,
                                      self.progress, self.tc.batch_size, self.resolved, eval_pending, write_id)
        path = ckpt.step_path(self.ckpt_dir, self.progress.step)
        if self.main:
            self.writer.wait()
            state = ckpt.snapshot(state)
            self.writer.submit(lambda: self._write_step(state, path))
        self.last_saved = path
        self._pause(started)
        return write_id

    def _write_step(self, state: dict, path: Path) -> None:
        """The background writer's job for a step checkpoint (rank 0)."""
        ckpt.save_step(state, path, self.tc.keep_last)
        self.last_written = path

    def _wait_writes(self, quiet: bool = False) -> None:
        """Rank 0: block until the background checkpoint writes are done, raising a write's error; `quiet` (the
        run already fails with another error) logs it as one line instead."""
        if self.writer is None:
            return
        started = time.perf_counter()
        try:
            self.writer.wait()
        except Exception as error:  # noqa: BLE001 - a second error while the run fails with another: said in a line
            if not quiet:
                raise
            log.error("the checkpoint write in the background failed too: %s", one_line(error))
        finally:
            self._pause(started)

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
        # One fused kernel per dtype and device (foreach), not two small kernels per tensor (~1.3k for a ResNet):
        # a tensor's max-abs is finite exactly when all of it is (NaN propagates, and max never overflows).
        largest = torch._foreach_norm([t.detach() for t in tensors], float("inf"))
        return (~torch.isfinite(torch.stack([x.float().to(self.info.device) for x in largest])).all()).float()
