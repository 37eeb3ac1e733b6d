"""What a run reports while it trains: rank 0's OUTPUT_DIR/metrics.jsonl (one JSON object per event, the file
`reproduce` reads), TensorBoard scalars, and a progress bar or log lines.

Named run_log, not logging, so that `import logging` inside the package still means the standard library.
"""

import json
import logging
import math
import sys
import threading
import time
from pathlib import Path

from rs_transfer.engine.trackers import start_trackers
from rs_transfer.files import FileWriteError, atomic_write_text, to_json

log = logging.getLogger(__name__)


class RunLogger:
    """Rank 0's outputs: OUTPUT_DIR/metrics.jsonl (one JSON object per event), TensorBoard, the optional trackers of
    `loggers` (engine/trackers.py: W&B, MLflow), and progress.

    The progress bar shows on a terminal only; elsewhere (SLURM logs, tests) each train event is one log line.
    On resume, events after the checkpoint's step (written by the killed run) are dropped from metrics.jsonl, and
    with `eval_pending` (the checkpoint was written before an evaluation the run will now do again) the evaluation
    at that step too: it may have been logged before the checkpoint after it failed (a full disk). The trackers
    cannot drop what they were sent, so they are not sent those events again (see `sent`).
    """

    def __init__(self, out: Path, enabled: bool, total: int, start_step: int, resumed: bool, eval_pending: bool = False,
                 samples: str = "images", loggers: tuple = ("tensorboard",), config: dict | None = None):
        self.enabled = enabled
        self.samples = samples  # what a sample is, for the throughput in log lines: images, or clips for video
        self.bar = None
        self.writer = None
        self.trackers = []
        self.finished = False
        if not enabled:
            return
        self.path = out / "metrics.jsonl"
        # The last step of each kind of event the trackers were sent, by this run or the one it resumes (whose
        # events past the checkpoint are still in metrics.jsonl here): W&B refuses a step lower than one it has, and
        # MLflow would hold the step twice. An exact resume computes those events again with the same values.
        self.sent: dict[str, int] = {}
        if resumed and self.path.exists():
            def kept_event(event: dict) -> bool:
                step = event.get("step", 0)
                return step < start_step or step == start_step and not (eval_pending and event.get("kind") == "eval")

            lines = _readable_events(self.path)
            for event in map(json.loads, lines):
                kind = event.get("kind", "")
                self.sent[kind] = max(self.sent.get(kind, -1), event.get("step", 0))
            _write_lines(self.path, [line for line in lines if kept_event(json.loads(line))])
        elif not resumed:
            self.path.write_text("")
        if "tensorboard" in loggers:
            from torch.utils.tensorboard import SummaryWriter

            _quiet_tensorboard_threads()
            self.tensorboard_dir = out / "tensorboard"
            self.tensorboard_failed = False
            self.writer = self._tensorboard(SummaryWriter, str(self.tensorboard_dir),
                                            purge_step=start_step if resumed else None)
        self.trackers = start_trackers(out, list(loggers), config or {}, resumed)
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
        scalars = {f"{kind}/{key}": value for key, value in record.items() if key not in ("step", "epoch")}
        if self.writer is not None:
            for name, value in scalars.items():
                self._tensorboard(self.writer.add_scalar, name, value, record["step"])
        if record["step"] > self.sent.get(kind, -1):
            self._to_trackers("log", scalars, record["step"])

    def final(self, metrics: dict, summary: dict, step: int) -> None:
        """The trackers' end of a finished run: the final metrics as final/<name> and the summary's numbers as
        summary/<name> (W&B: the run summary; MLflow: metrics at the last step). metrics.jsonl and TensorBoard
        have these already (the last evaluation; summary.json)."""
        if not self.enabled:
            return
        values = {f"final/{key}": value for key, value in metrics.items() if _is_number(value)}
        values.update({f"summary/{key}": value for key, value in summary.items() if _is_number(value)})
        self._to_trackers("final", values, step)
        self.finished = True

    def _to_trackers(self, method: str, values: dict, step: int) -> None:
        """`tracker.method(values, step)` on each tracker. One that fails (a full disk, a lost server) is turned off
        with one warning: the run goes on, and metrics.jsonl and TensorBoard still hold every record."""
        for tracker in list(self.trackers):
            try:
                getattr(tracker, method)(values, step)
            except Exception as error:  # each library raises its own types
                log.warning("%s failed (%s): it is off for the rest of this run; metrics.jsonl and TensorBoard go on",
                            tracker.name, " ".join(str(error).split())[:300] or type(error).__name__)
                self.trackers.remove(tracker)
                self._close_tracker(tracker)

    def train(self, record: dict) -> None:
        if not self.enabled:
            return
        self._write("train", record)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record.get('loss', math.nan):.4f}", lr=f"{record['lr']:.3g}",
                                 **{f"{self.samples}_s": f"{record['images_per_s']:.0f}"})
        else:
            log.info("step %d/%d epoch %.2f loss %.4f lr %.4g %.1f %s/s eta %s", record["step"], self.total,
                     record["epoch"], record.get("loss", math.nan), record["lr"], record["images_per_s"], self.samples,
                     self._eta(record["step"]))

    def progress(self, step: int, loss: float, lr: float) -> None:
        """A progress line between log events (the first step, a slow run's wall-clock interval): printed only,
        never a metrics.jsonl or TensorBoard event, so the logged records do not depend on the machine's speed.
        `loss`: this process's mean since the last log event. A terminal's progress bar already shows it."""
        if self.enabled and self.bar is None:
            log.info("step %d/%d loss %.4f (this process) lr %.4g eta %s", step, self.total, loss, lr, self._eta(step))

    def _eta(self, step: int) -> str:
        eta = (time.perf_counter() - self.start) / max(step - self.start_step, 1) * (self.total - step)
        return f"{int(eta // 3600)}:{int(eta % 3600 // 60):02d}:{int(eta % 60):02d}"

    def eval(self, record: dict) -> None:
        if not self.enabled:
            return
        self._write("eval", record)
        message = " ".join(f"{k} {v:.4f}" for k, v in record.items() if k not in ("step", "epoch"))
        (self.bar.write if self.bar is not None else log.info)(f"eval at step {record['step']}: {message}")

    def images(self, step: int, pictures: dict) -> None:
        """TensorBoard images predictions/<name> at `step`: each uint8 (3, H, W) (Task.visualize)."""
        if self.writer is None:
            return
        for name, picture in pictures.items():
            self._tensorboard(self.writer.add_image, f"predictions/{name}", picture, step, dataformats="CHW")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.writer is not None:
            writer, self.writer = self.writer, None
            if self.tensorboard_failed:  # said once already; closing would raise the same error again
                try:
                    writer.close()
                except OSError:
                    pass
            else:
                self._tensorboard(writer.close)
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            self._close_tracker(tracker)

    def _close_tracker(self, tracker) -> None:
        """Close one tracker's run, marked finished or stopped; a failure is a warning (the run's own files are
        written)."""
        try:
            tracker.close(self.finished)
        except Exception as error:
            log.warning("%s could not close its run: %s", tracker.name, " ".join(str(error).split())[:300])

    def _tensorboard(self, call, *args, **kwargs):
        """`call(*args, **kwargs)`, a TensorBoard call. Its writer thread keeps a write's error (a full or read-only
        disk) and raises it at the next call: here, as one FileWriteError naming the folder (metrics.jsonl and the
        checkpoints are written apart from it)."""
        try:
            return call(*args, **kwargs)
        except OSError as error:
            self.tensorboard_failed = True
            raise FileWriteError(f"cannot write TensorBoard events in {self.tensorboard_dir}: "
                                 f"{error.strerror or error}") from None

    def _append(self, record: dict) -> None:
        line = to_json(record, where=str(self.path)) + "\n"
        try:
            with open(self.path, "a") as f:
                f.write(line)
        except OSError as error:
            raise FileWriteError(f"cannot write {self.path}: {error.strerror or error}") from None


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _quiet_tensorboard_threads() -> None:
    """Keep the traceback of a failed TensorBoard writer thread off the terminal: tensorboard's _AsyncWriterThread
    stores a write error and re-raises it to end the thread, and RunLogger._tensorboard reports that same error as
    one line when the training thread next writes. Other threads' exceptions go to the hook as before."""
    previous = threading.excepthook
    if getattr(previous, "quiets_tensorboard", False):
        return

    def hook(args):
        if type(args.thread).__name__ == "_AsyncWriterThread" and isinstance(args.exc_value, OSError):
            return
        previous(args)

    hook.quiets_tensorboard = True
    threading.excepthook = hook


def read_events(path: Path) -> list[dict]:
    """The events of a run's metrics.jsonl as dicts ({"kind": "train" | "eval", "step", ...}), in order; a line torn
    by a kill mid-write is dropped with a warning. Imports no torch."""
    return [json.loads(line) for line in _readable_events(path)]


def _readable_events(path: Path) -> list[str]:
    """The lines of metrics.jsonl that parse; a line torn by a kill mid-write (the last one) is dropped."""
    lines = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):  # JSONDecodeError; a 5000-digit number; a hand-made nesting bomb
            record = None
        if not isinstance(record, dict):
            log.warning("%s line %d is not a complete JSON record (a write cut short by a kill): dropped", path,
                        number)
            continue
        lines.append(line)
    return lines


def _write_lines(path: Path, lines: list[str]) -> None:
    atomic_write_text(path, "".join(line + "\n" for line in lines))
