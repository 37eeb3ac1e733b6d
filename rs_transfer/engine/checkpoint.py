"""Training checkpoints: atomic writes, keep-last-N + best, RNG states that load with `weights_only=True`.

A checkpoint is a dict of tensors and plain Python values:
    model, ema (absent without EMA): plain state dicts of the task's model (no `module.` prefix; the network's
        keys under `net.`, see task.py); models/weights.py reads them
    optimizer, scheduler: their state dicts
    step (optimizer steps done), epoch, step_in_epoch (the sampler position: steps done in `epoch`)
    batch_size (global), best (the best primary metric so far, or None), best_step (its step), metrics (the last
        evaluation), metrics_step, eval_pending (written just before an evaluation of this step: best/metrics are
        those from before it, and its result is in the record beside the file, see record_evaluation and load),
        write_id (a random name of this write, which the record carries), wall_s and train_s (seconds of the run so far, summed over resumes; train_s without
        evaluations and checkpoint writes)
    rng: one entry per rank: torch, cuda (list), numpy and python generator states as tensors/lists/ints
    config: the resolved run config as a plain dict
Files: OUTPUT_DIR/checkpoints/step_00001234.pt (the newest `keep_last`) and best.pt (a hard link to one of them, or a
copy), each with its evaluation record step_00001234.eval.json / best.eval.json when it was evaluated.
"""

import logging
import os
import queue
import random
import re
import shutil
import threading
from pathlib import Path

import numpy as np
import torch

from rs_transfer.errors import UserError
from rs_transfer.files import (FileWriteError, atomic_open, atomic_write_json, read_json, remove_stale_temp_files,
                                temp_path)
from rs_transfer.models.weights import read_file

log = logging.getLogger(__name__)

STEP_FILE = re.compile(r"^step_(\d+)\.pt$")


class CheckpointError(UserError):
    pass


def atomic_save(obj, path: Path) -> None:
    """`torch.save` through `files.atomic_open`: a kill at any moment leaves the old file or the new one, never a
    half-written `path`; a full disk or read-only folder raises files.FileWriteError and leaves no temp file."""
    with atomic_open(path, "wb") as file:
        torch.save(obj, file)


def atomic_copy(source: Path, path: Path) -> None:
    """Copy a written checkpoint to `path` atomically (cheaper than serialising the same state twice); raises
    files.FileWriteError as atomic_save does."""
    with atomic_open(path, "wb") as file, open(source, "rb") as original:
        shutil.copyfileobj(original, file, 16 << 20)


def atomic_link(source: Path, path: Path) -> None:
    """Make `path` the same file as the written checkpoint `source`: a hard link (no bytes copied; the file lives
    on while either name does, so pruning `source` leaves `path` whole), made under a temp name and renamed over
    `path`, so a kill leaves the old `path` or the new one. Where the file system has no hard links (some network
    and FAT file systems: EPERM, ENOTSUP, EXDEV...) it is an atomic copy. Raises files.FileWriteError."""
    tmp = temp_path(Path(path))
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        atomic_copy(source, path)
        return
    try:
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise FileWriteError(f"cannot write {path}: {error.strerror or error} (the previous file, if any, is "
                             "intact)") from None


def save_step(state: dict, path: Path, keep_last: int) -> None:
    """Rank 0: write the step checkpoint `path`, then prune the folder. An evaluation's result is not in it but in
    its record (`record_evaluation`), written once the evaluation is done: one checkpoint write per evaluation."""
    atomic_save(state, path)
    prune(Path(path).parent, keep_last)


def record_path(path: Path) -> Path:
    """The evaluation record of checkpoint `path`: step_00001234.pt -> step_00001234.eval.json, best.pt ->
    best.eval.json."""
    path = Path(path)
    return path.with_name(f"{path.stem}.eval.json")


def record_evaluation(path: Path, record: dict, best: bool) -> None:
    """Rank 0, after the evaluation of the step checkpoint `path` (written before it): when `best`, best.pt becomes
    that file (atomic_link) with its record beside it; then the step's record, last, as the commit point: a kill
    before it leaves the evaluation unrecorded and the resumed run evaluates the step again (and links best.pt
    again, the same file). `record`: {write_id, best, best_step, metrics, metrics_step} (see `load`)."""
    path = Path(path)
    if best:
        atomic_link(path, path.parent / "best.pt")
        atomic_write_json(record_path(path.parent / "best.pt"), record)
    atomic_write_json(record_path(path), record)


RECORD_KEYS = ("best", "best_step", "metrics", "metrics_step")


def with_record(state: dict, path: Path) -> dict:
    """`state` (read from `path`) with its evaluation's result when the record beside it belongs to this very write
    (same write_id): eval_pending then False. A missing, foreign (an older write of the same step) or unreadable
    record leaves the state as written: eval_pending, so a resumed run evaluates the step again."""
    if not state.get("eval_pending") or "write_id" not in state or not record_path(path).is_file():
        return state
    try:
        record = read_json(record_path(path), "the evaluation record of a checkpoint")
    except UserError as error:
        log.warning("%s (the step is evaluated again on resume)", error)
        return state
    if not isinstance(record, dict) or record.get("write_id") != state["write_id"] or \
            any(key not in record for key in RECORD_KEYS):
        return state
    return {**state, **{key: record[key] for key in RECORD_KEYS}, "eval_pending": False}


def snapshot(obj):
    """A copy of a checkpoint's state in host memory, for a background write while training changes the model:
    every tensor copied to the CPU (from a GPU without blocking, then one synchronisation, so the copies are complete
    before the write starts), containers copied, other values shared (they are immutable or replaced, not changed)."""
    copied = _host_copy(obj)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return copied


def _host_copy(obj):
    if torch.is_tensor(obj):
        obj = obj.detach()
        if obj.device.type == "cpu":
            return obj.clone()
        return obj.to("cpu", non_blocking=True)
    if isinstance(obj, dict):
        return {key: _host_copy(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_host_copy(value) for value in obj)
    return obj


class BackgroundWriter:
    """Rank 0's checkpoint writes in one background thread, in order, so that training goes on while a file is
    serialised and fsync'd. `submit` queues a job; `wait` returns when all are done. A job's error (a full disk:
    files.FileWriteError; CheckpointError) is raised on the training thread by the next `submit` or `wait`, as the
    error a synchronous write would have raised, and the jobs queued after it are dropped (a record must not follow
    a checkpoint that failed). The thread is a daemon: a process that dies does not hang on it, and the atomic
    writes leave the previous files whole."""

    def __init__(self):
        self.jobs: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None

    def submit(self, job) -> None:
        self._raise()
        if self.thread is None:
            self.thread = threading.Thread(target=self._work, name="checkpoint-writer", daemon=True)
            self.thread.start()
        self.jobs.put(job)

    def wait(self) -> None:
        """Block until every queued job has run; raise the first error one of them raised."""
        self.jobs.join()
        self._raise()

    def _raise(self) -> None:
        error, self.error = self.error, None
        if error is not None:
            raise error

    def _work(self) -> None:
        while True:
            job = self.jobs.get()
            try:
                if self.error is None:
                    job()
            except BaseException as error:  # noqa: BLE001 - handed to the training thread, which raises it
                self.error = error
            finally:
                self.jobs.task_done()


def step_path(folder: Path, step: int) -> Path:
    return Path(folder) / f"step_{step:08d}.pt"


def step_checkpoints(folder: Path) -> list[Path]:
    """Step checkpoints in `folder`, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := STEP_FILE.match(p.name))]
    return [p for _, p in sorted(found)]


def prune(folder: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` step checkpoints (with their evaluation records), and temp files left
    by killed writers. best.pt is a hard link or a copy (atomic_link), never the step file's only name, so deleting
    a step file never takes best.pt's content with it."""
    for path in step_checkpoints(folder)[: -keep_last or None] if keep_last > 0 else []:
        path.unlink(missing_ok=True)
        record_path(path).unlink(missing_ok=True)
    remove_stale_temp_files(folder)


TRAINING_KEYS = ("model", "optimizer", "scheduler", "step", "epoch", "step_in_epoch", "batch_size", "rng")


def load(path: Path) -> dict:
    """The dict in a checkpoint file, read by the one reader (`models.weights.read_file`, `weights_only=True`), with
    its evaluation's result from its record when that evaluation finished (`with_record`); CheckpointError (one line
    naming the file) if it is missing or unreadable."""
    return with_record(read_file(path, what="checkpoint", error=CheckpointError), path)


def load_training(path: Path) -> dict:
    """A training checkpoint to resume from (see the module docstring).

    Raises CheckpointError for a missing or unreadable file, and for one that holds weights only (`final.pt`,
    `weights.pth`, a plain state dict): those start a new run through `model.weights`, they cannot resume one.
    """
    state = load(path)
    missing = [key for key in TRAINING_KEYS if key not in state]
    if missing:
        raise CheckpointError(
            f"{path} is not a training checkpoint (no {', '.join(missing[:3])}): it holds weights only, like "
            "final.pt or weights.pth. Resume from OUTPUT_DIR/checkpoints/step_*.pt (or --resume); start a new run "
            "from these weights with model.weights=PATH"
        )
    return state


def find_resume(resume: str | None, folder: Path) -> Path | None:
    """The file to resume from: None, "auto" (newest readable step checkpoint in `folder`, if any) or a path."""
    if resume is None:
        return None
    if resume != "auto":
        if not Path(resume).is_file():
            raise CheckpointError(f"train.resume: checkpoint not found: {resume}")
        return Path(resume)
    found = step_checkpoints(folder)
    for path in reversed(found):
        try:
            load_training(path)
            return path
        except CheckpointError as error:  # atomic writes make this rare: a disk fault or a hand-copied file
            log.warning("skipping unreadable checkpoint %s (%s)", path, error)
    if found:
        raise CheckpointError(f"none of the {len(found)} step checkpoints in {folder} can be read (see the warnings "
                              "above); the run cannot resume. Move them away to start again from step 0")
    return None


def rng_state() -> dict:
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": py_version, "internal": list(py_internal), "gauss_next": py_gauss},
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
