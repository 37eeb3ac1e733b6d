"""Teacher inference over unlabelled images: sharded over ranks, resumable, then Noisy Student's selection.

`rs-transfer pseudo-label --teacher CKPT --images DIR_OR_SHARDS --out OUT` (under torchrun for many GPUs):
- rank r of W labels images r, r + W, ... (sorted by name) and appends one JSON line per image to its own shard
  OUT/rank{r}-of-{W}.jsonl: {"ref", "label", "confidence"[, "topk": [[class, prob], ...]]}; an unreadable image
  gets a line with label -1 and its error, and is never selected.
- every batch is flushed and fsynced; after a kill, the rerun cuts a torn last line and continues after the
  last complete one, so finished work is never redone or lost. A stop signal (SIGTERM, SIGUSR1: SLURM, torchrun)
  lets the current batch finish and be fsynced, then stops with StoppedBySignal (the CLI's `stopped:` line, exit
  128 + the signal). A full or read-only disk is one FileWriteError naming the shard; the lines before it stay.
- when every shard is complete, rank 0 writes OUT/selected.jsonl (atomically): images whose confidence reaches
  `threshold`, then, with `per_class` > 0, per class the `per_class` most confident ones, duplicating images of
  classes that have fewer (Noisy Student: threshold 0.3, 130K per class); and OUT/meta.json, which co-training reads.
"""

import json
import logging
import os
import signal
import threading
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from rs_transfer.engine import distributed
from rs_transfer.engine.loader import STOP_SIGNALS, Loader
from rs_transfer.errors import StoppedBySignal, UserError
from rs_transfer.files import FileWriteError, atomic_write_json, atomic_write_text
from rs_transfer.models import create_model
from rs_transfer.models.normalize import Normalize
from rs_transfer.models.weights import check_fit, read_state_dict
from rs_transfer.pretrain import data, transforms

log = logging.getLogger(__name__)


class _Images(Dataset):
    """Images for inference: a failed decode yields a placeholder and the error, never a substitute image."""

    def __init__(self, items: list, transform):
        self.items = items
        self.transform = transform
        self.size = transform.transforms[0].image_size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        item = self.items[index]
        try:
            return self.transform(data.decode(data.read_bytes(item.where))), ""
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
            log.warning("skipping unreadable image %s (%s)", item.ref, data.describe_error(error))
            return torch.zeros(3, self.size, self.size, dtype=torch.uint8), data.describe_error(error)


def load_teacher(path: str, model_name: str) -> torch.nn.Module:
    """A zoo model with the teacher's weights: a timm/zoo weights file or a `pretrain` checkpoint (EMA preferred)."""
    state = read_state_dict(path)
    if "fc.weight" not in state:
        raise UserError(f"teacher {path} has no classifier (fc.weight): a teacher must predict classes")
    model = create_model(model_name, num_classes=state["fc.weight"].shape[0])
    check_fit(path, state, model.state_dict(), what=f"model {model_name!r}", hint=" (give --model)")
    model.load_state_dict(state)
    return model.eval()


def shard_path(out: Path, rank: int, world: int) -> Path:
    return out / f"rank{rank:05d}-of-{world:05d}.jsonl"


def _complete_lines(path: Path) -> int:
    """Lines already written to `path`; a torn last line (killed mid-write) is cut off."""
    if not path.exists():
        return 0
    raw = path.read_bytes()
    keep = raw.rfind(b"\n") + 1
    if keep < len(raw):
        with open(path, "r+b") as file:
            file.truncate(keep)
    return raw[:keep].count(b"\n")


def _append_lines(path: Path, lines: list, done: int) -> None:
    """Append `lines` to shard `path` and fsync them; `done`: the complete lines already in it (for the message).

    Raises FileWriteError when the disk is full or read-only; at most a torn last line is left, which the rerun cuts.
    The file is opened per batch so that its closing, which retries a failed write, happens inside the `try`.
    """
    try:
        with open(path, "a") as file:
            file.write("".join(lines))
            file.flush()
            os.fsync(file.fileno())
    except OSError as error:
        raise FileWriteError(f"cannot write pseudo-label shard {path}: {error.strerror or error}; the {done} labels "
                             "written before are kept, rerun to continue") from None


class _StopFlag:
    """The name of the stop signal received, if any (set by the signal handler, read after each batch)."""

    def __init__(self):
        self.signalled: str | None = None

    def __call__(self, number, frame) -> None:
        self.signalled = signal.Signals(number).name


@contextmanager
def _stop_signals_recorded():
    """Record STOP_SIGNALS in a _StopFlag instead of dying, so the current batch reaches the disk; the previous
    handlers are restored afterwards. Handlers can only be installed in the main thread: elsewhere nothing changes."""
    flag = _StopFlag()
    handled = STOP_SIGNALS if threading.current_thread() is threading.main_thread() else ()
    previous = {number: signal.signal(number, flag) for number in handled}
    try:
        yield flag
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def label_images(teacher: str, images: str, out: str, model_name: str = "rs152", image_size: int = 224,
                 batch_size: int = 64, topk: int = 10, threshold: float = 0.3, per_class: int = 0,
                 num_workers: int = 4, max_batches: int | None = None) -> dict:
    """Run (or continue) pseudo-labelling; returns meta.json's content once all shards are complete, else {}.

    Raises StoppedBySignal after the current batch when SIGTERM or SIGUSR1 arrives (rerun to continue), and
    FileWriteError naming the folder or shard when `out` cannot be written (the labels written before are kept).
    """
    out_dir = Path(out)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise FileWriteError(f"cannot create the pseudo-label folder {out_dir}: {error.strerror or error}") from None
    info = distributed.init_distributed("auto")
    distributed.seed_everything(0)  # the teacher's weights are all loaded, but nothing may depend on the RNG
    rank, world, device = info.rank, info.world_size, info.device
    others = [p for p in out_dir.glob("rank*-of-*.jsonl") if not p.name.endswith(f"-of-{world:05d}.jsonl")]
    if others:
        raise UserError(f"{out_dir} holds shards of a run with another number of ranks ({others[0].name}); "
                        f"resume with the same world size or use a new --out")
    items = data.list_images(Path(images))
    mine = items[rank::world]
    path = shard_path(out_dir, rank, world)
    done = _complete_lines(path)
    if done < len(mine):
        model = load_teacher(teacher, model_name).to(device)
        normalize = Normalize().to(device)  # the loader ships uint8 images
        num_classes = model.fc.out_features
        loader = Loader(_Images(mine[done:], transforms.eval_transform(image_size)), batch_size=batch_size,
                        num_workers=num_workers, pin_memory=device.type == "cuda")
        log.info("rank %d: %d of %d images already labelled in %s", rank, done, len(mine), path)
        written = done
        with _stop_signals_recorded() as stop, torch.no_grad():
            for step, (batch, errors) in enumerate(loader):
                if max_batches is not None and step >= max_batches:
                    break
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    logits = model(normalize(batch.to(device, non_blocking=True)))
                probs = logits.float().softmax(dim=1).cpu()
                top_p, top_i = probs.topk(min(max(topk, 1), num_classes), dim=1)
                lines = []
                for j in range(len(batch)):
                    ref = mine[done + step * batch_size + j].ref
                    if errors[j]:
                        record = {"ref": ref, "label": -1, "confidence": 0.0, "error": errors[j]}
                    else:
                        record = {"ref": ref, "label": int(top_i[j, 0]), "confidence": round(float(top_p[j, 0]), 6)}
                        if topk > 0:
                            record["topk"] = [[int(c), round(float(p), 6)] for c, p in zip(top_i[j], top_p[j])]
                    lines.append(json.dumps(record) + "\n")
                _append_lines(path, lines, written)
                written += len(lines)
                if stop.signalled and written < len(mine):
                    raise StoppedBySignal(f"stopped by {stop.signalled} after {written} of {len(mine)} images on "
                                          f"rank {rank}; rerun the same command to continue", stop.signalled)
    else:
        num_classes = None
    distributed.barrier()
    expected = {r: len(items[r::world]) for r in range(world)}
    complete = all(_complete_lines(shard_path(out_dir, r, world)) == n for r, n in expected.items())
    if not complete:
        log.info("pseudo-labelling stopped before the end; rerun the same command to continue")
        return {}
    meta = {}
    if rank == 0:
        records = [json.loads(line) for r in range(world)
                   for line in shard_path(out_dir, r, world).read_text().splitlines()]
        if num_classes is None:
            num_classes = load_teacher(teacher, model_name).fc.out_features
        selected = select(records, threshold, per_class)
        meta = {"images": str(Path(images).resolve()), "teacher": str(teacher), "model": model_name,
                "image_size": image_size, "num_classes": num_classes, "topk": topk, "threshold": threshold,
                "per_class": per_class, "world_size": world, "labelled": len(records),
                "unreadable": sum(r["label"] < 0 for r in records), "selected": len(selected)}
        atomic_write_text(out_dir / "selected.jsonl", "".join(json.dumps(r) + "\n" for r in selected))
        atomic_write_json(out_dir / "meta.json", meta)
        log.info("pseudo-labels: %d images, %d selected -> %s", len(records), len(selected), out_dir / "selected.jsonl")
    distributed.barrier()
    return meta


def select(records: list, threshold: float, per_class: int) -> list:
    """Noisy Student's filtering and balancing (see the module docstring); order: class, then confidence."""
    by_class = defaultdict(list)
    for record in records:
        if record["label"] >= 0 and record["confidence"] >= threshold:
            by_class[record["label"]].append(record)
    selected = []
    for label in sorted(by_class):
        group = sorted(by_class[label], key=lambda r: (-r["confidence"], r["ref"]))
        if per_class > 0:
            group = [group[i % len(group)] for i in range(per_class)]
        selected += group
    return selected


def read_selection(folder: Path) -> tuple:
    meta_path, selected_path = folder / "meta.json", folder / "selected.jsonl"
    if not meta_path.is_file() or not selected_path.is_file():
        raise UserError(f"{folder} holds no finished pseudo-labels (meta.json and selected.jsonl): run "
                        "`rs-transfer pseudo-label ... --out` to the end first")
    meta = json.loads(meta_path.read_text())
    records = [json.loads(line) for line in selected_path.read_text().splitlines()]
    if not records:
        raise UserError(f"{selected_path} selects no images: lower --threshold")
    return meta, records

