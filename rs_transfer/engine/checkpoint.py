"""Training checkpoints: atomic writes, keep-last-N + best, RNG states that load with `weights_only=True`.

A checkpoint is a dict of tensors and plain Python values:
    model, ema (absent without EMA): plain state dicts of the task's model (no `module.` prefix; the network's
        keys under `net.`, see task.py); models/weights.py reads them
    optimizer, scheduler: their state dicts
    step (optimizer steps done), epoch, step_in_epoch (the sampler position: steps done in `epoch`)
    batch_size (global), best (the best primary metric so far, or None), best_step (its step), metrics (the last
        evaluation), wall_s and train_s (seconds of the run so far, summed over resumes; train_s without
        evaluations and checkpoint writes)
    rng: one entry per rank: torch, cuda (list), numpy and python generator states as tensors/lists/ints
    config: the resolved run config as a plain dict
Files: OUTPUT_DIR/checkpoints/step_00001234.pt (the newest `keep_last`) and best.pt.
"""

import logging
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from rs_transfer.errors import UserError
from rs_transfer.files import atomic_open, remove_stale_temp_files
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


def save_step(state: dict, path: Path, best: bool, keep_last: int) -> None:
    """Rank 0: write the step checkpoint `path` (and, when `best`, best.pt beside it), then prune the folder.

    best.pt is written first and the step file copied from it: the step checkpoint records this result as the
    best so far and a run resumed from it never writes best.pt for it again, so a kill between the two files
    must not leave the step one alone.
    """
    path = Path(path)
    if best:
        atomic_save(state, path.parent / "best.pt")
        atomic_copy(path.parent / "best.pt", path)
    else:
        atomic_save(state, path)
    prune(path.parent, keep_last)


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
    """Delete all but the newest `keep_last` step checkpoints, and temp files left by killed writers."""
    for path in step_checkpoints(folder)[: -keep_last or None] if keep_last > 0 else []:
        path.unlink(missing_ok=True)
    remove_stale_temp_files(folder)


TRAINING_KEYS = ("model", "optimizer", "scheduler", "step", "epoch", "step_in_epoch", "batch_size", "rng")


def load(path: Path) -> dict:
    """The dict in a checkpoint file, read by the one reader (`models.weights.read_file`, `weights_only=True`);
    CheckpointError (one line naming the file) if it is missing or unreadable."""
    return read_file(path, what="checkpoint", error=CheckpointError)


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
