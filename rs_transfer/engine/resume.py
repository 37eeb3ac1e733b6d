"""Continuing a run: what a training checkpoint holds, which one a run resumes from, what a resume refuses, and the
run folder it writes into.

`training_state` is what the trainer saves (every rank takes part: the RNG states are gathered) and `restore` puts
it back, so the two sides of the format (checkpoint.py's module docstring) sit together. `check_resumable` refuses
a config that changed a key that changes the run; `prepare_output` writes config.yaml only once the resume has
been accepted, so a refused resume leaves the run's config as it was.
"""

import logging
from dataclasses import dataclass, field
from pathlib import Path

from rs_transfer.config import RESUME_MAY_CHANGE, RunConfig, flatten, run_differences, save_config, to_dict
from rs_transfer.engine import checkpoint as ckpt
from rs_transfer.engine.distributed import DistInfo, all_gather_object, seed_everything
from rs_transfer.errors import one_line
from rs_transfer.files import make_dir, remove_stale_temp_files

log = logging.getLogger(__name__)


@dataclass
class Progress:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # the epoch being run (epochs done, at an epoch boundary)
    step_in_epoch: int = 0
    best: float | None = None
    best_step: int | None = None  # the step `best` was measured at (None in checkpoints older than this field)
    metrics: dict = field(default_factory=dict)  # the last evaluation
    metrics_step: int = -1  # the step `metrics` were computed at
    eval_pending: bool = False  # checkpointed just before an evaluation of this step, which has not finished
    # Seconds spent by the run up to this point, summed over resumed segments (a resumed run starts from the
    # checkpoint's values, so the time of work redone after a kill is counted once): all of it, and training alone
    # (without evaluations and checkpoint writes). summary.json reports them.
    wall_s: float = 0.0
    train_s: float = 0.0


def training_state(model, ema, optimizer, scheduler, scaler, progress: Progress, batch_size: int, config: dict,
                   eval_pending: bool = False, write_id: str | None = None) -> dict:
    """The checkpoint of a run at `progress` (called on every rank: each rank's RNG states are gathered).

    `scaler` is the run's torch.amp.GradScaler; its state (loss scale, growth tracker) is saved when it is enabled
    (train.amp resolved to fp16), so a resumed fp16 run scales and skips as the uninterrupted one would.
    """
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "step": progress.step,
        "epoch": progress.epoch,
        "step_in_epoch": progress.step_in_epoch,
        "batch_size": batch_size,
        "best": progress.best,
        "best_step": progress.best_step,
        "metrics": progress.metrics,
        "metrics_step": progress.metrics_step,
        "eval_pending": eval_pending,
        "write_id": write_id,  # names this write: its evaluation record (checkpoint.record_evaluation) carries it
        "wall_s": progress.wall_s,
        "train_s": progress.train_s,
        "rng": all_gather_object(ckpt.rng_state()),
        "config": config,
    }
    if ema is not None:
        state["ema"] = ema.module.state_dict()
    if scaler.is_enabled():
        state["scaler"] = scaler.state_dict()
    return state


def pick_resume(resume: str | None, ckpt_dir: Path) -> tuple[Path | None, str | None]:
    """(checkpoint to resume from, or None; the reason not to start, or None)."""
    if resume is None and ckpt.step_checkpoints(ckpt_dir):
        return None, (f"{ckpt_dir} holds checkpoints of an earlier run: continue it with train.resume=auto, or "
                      "choose another output_dir")
    try:
        return ckpt.find_resume(resume, ckpt_dir), None
    except ckpt.CheckpointError as error:
        return None, str(error)


def restore(path, config: RunConfig, info: DistInfo, model, ema, optimizer, scheduler, scaler) -> Progress:
    """Load checkpoint `path` into the run's objects and this rank's RNGs; CheckpointError when it does not fit.

    train.amp may change on resume: a run that is fp16 now and whose checkpoint has no scaler state (a bf16 or
    float32 run, or one from before fp16 existed) starts a fresh GradScaler; a checkpoint's scaler state is
    dropped when the run is no longer fp16.
    """
    state = ckpt.load_training(path)
    if state["batch_size"] != config.train.batch_size:
        raise ckpt.CheckpointError(
            f"checkpoint {path} was trained with train.batch_size={state['batch_size']}, this run has "
            f"{config.train.batch_size}: resuming needs the same global batch"
        )
    if isinstance(state.get("config"), dict):
        check_resumable(state["config"], to_dict(config), path, defaults=to_dict(type(config)()))
    if ema is not None and "ema" not in state:
        raise ckpt.CheckpointError(f"checkpoint {path} has no EMA weights but train.ema_decay is set")
    try:
        model.load_state_dict(state["model"])
        if ema is not None:
            ema.module.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _restore_scaler(scaler, state.get("scaler"), path)
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
    # Checkpoints older than best_step / wall_s / train_s: the summary then has no best step and counts time from
    # this resume on.
    return Progress(step=state["step"], epoch=state["epoch"], step_in_epoch=state["step_in_epoch"],
                    best=state["best"], best_step=state.get("best_step"), metrics=state["metrics"],
                    metrics_step=state.get("metrics_step", fallback_step), eval_pending=state.get("eval_pending", False),
                    wall_s=state.get("wall_s", 0.0), train_s=state.get("train_s", 0.0))


def _restore_scaler(scaler, saved: dict | None, path) -> None:
    if scaler.is_enabled() and saved:
        scaler.load_state_dict(saved)
    elif scaler.is_enabled():
        log.info("checkpoint %s has no gradient scaler state (not an fp16 run): fp16 starts a fresh scaler, loss "
                 "scale %g", path, scaler.get_scale())
    elif saved:
        log.info("checkpoint %s was an fp16 run; this run is not, so its gradient scaler state is not used", path)


def check_resumable(saved: dict, current: dict, path, defaults: dict | None = None) -> None:
    """Refuse a resume whose config differs from the checkpoint's in a key that changes the run.

    Raises CheckpointError listing every such key with both values (checked before anything is written).
    """
    changed = run_differences(saved, current, RESUME_MAY_CHANGE, defaults=defaults)
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


def prepare_output(config: RunConfig, out: Path, ckpt_dir: Path) -> None:
    """Rank 0: the run folder with config.yaml; temp files of killed writers removed. One error if unwritable."""
    make_dir(out, "output_dir")
    make_dir(ckpt_dir, "the checkpoint folder")
    save_config(config, out)
    for folder in (out, ckpt_dir):
        for path in remove_stale_temp_files(folder):
            log.info("removed %s, left by a writer that was killed", path)
