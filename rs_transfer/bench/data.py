"""`rs-transfer bench data`: decoded + augmented images per second of one data-loading worker.

Every pipeline starts from the JPEG bytes already in memory (so disk speed is out of the measurement) and ends
with what its loader ships: ours a uint8 tensor (decode, random resized crop, flip, RandAugment, to tensor; the
model normalises on the device), timm's a normalised float tensor (its train.py pipeline). It runs
in this one process with one intra-op thread, which is what a DataLoader worker does; a node's loader throughput
is this number times the workers it runs (while cores last).

Pipelines, side by side on the same images in the same run:
- rs-tf: our train transform with the official TF RandAugment (the RS recipe's default)
- rs-timm: our train transform with timm's RandAugment op
- timm: `timm.data.create_transform(S, is_training=True, auto_augment="rand-mM-n2", interpolation="bicubic")`,
  what timm's train.py builds for the same recipe
- decode: JPEG decode and RGB conversion alone, the floor under all three
- dali-cpu (when NVIDIA DALI is installed, `pip install -e ".[dali]"`): rs_transfer.pretrain.dali's pipeline, the
  same train transform on DALI's CPU operators with one DALI thread, from the same bytes to the same uint8 batch.
  Its rate is images per CPU-second of the whole process (DALI's executor and the Python callback included), the
  per-core figure to set beside a worker's. In JSON it is its own entry `dali` (null when DALI is not installed),
  not one of the per-worker pipelines: DALI runs its own threads instead of DataLoader workers.
"""

import io
import json
import os
import random
import time
from pathlib import Path

import numpy as np
import torch

from rs_transfer.errors import UserError
from rs_transfer.pretrain import data, transforms


def synthetic_jpegs(count: int, size=(500, 375), seed: int = 0) -> list:
    """JPEG bytes (quality 90) at ImageNet's typical 500 x 375, striped with noise (see pretrain/synthetic.py)."""
    from rs_transfer.pretrain.synthetic import make_image

    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        buffer = io.BytesIO()
        make_image(i % 10, 10, size, rng).save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def read_jpegs(folder: Path, count: int) -> list:
    items = data.list_images(folder)[:count]
    return [data.read_bytes(item.where) for item in items]


def pipelines(resolution: int, magnitude: float) -> dict:
    from timm.data import create_transform

    timm_transform = create_transform(resolution, is_training=True, auto_augment=f"rand-m{magnitude:g}-n2",
                                      interpolation="bicubic")
    return {
        "rs-tf": transforms.train_transform(resolution, "tf", 2, magnitude),
        "rs-timm": transforms.train_transform(resolution, "timm", 2, magnitude),
        "timm": timm_transform,
        "decode": None,
    }


def measure(jpegs: list, transform, min_seconds: float) -> tuple:
    """(images per CPU second, images per wall second) over whole passes through `jpegs`, for `min_seconds` of CPU.

    CPU time is the figure to plan with: a worker with a core to itself runs at that rate, while wall time on a
    shared machine also counts the time other processes held the core.
    """
    for payload in jpegs[:4]:  # warm-up: first-call costs (imports, lookup tables)
        _run(payload, transform)
    count, cpu, wall = 0, time.process_time(), time.perf_counter()
    while True:
        for payload in jpegs:
            _run(payload, transform)
        count += len(jpegs)
        cpu_elapsed = time.process_time() - cpu
        if cpu_elapsed >= min_seconds:
            return count / cpu_elapsed, count / (time.perf_counter() - wall)


class CycledKeys:
    """Keys (pass, index) cycling through `count` images for `length` keys, computed on demand."""

    def __init__(self, count: int, length: int):
        self.count, self.length = count, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, position: int) -> tuple:
        return divmod(position, self.count)


def measure_dali(jpegs: list, resolution: int, magnitude: float, min_seconds: float, seed: int,
                 batch_size: int = 32) -> tuple:
    """(images per CPU second, images per wall second) of the DALI CPU pipeline with one thread, as `measure`."""
    from rs_transfer.pretrain.dali import DaliBatches

    batches = iter(DaliBatches(lambda index: (jpegs[index], 0), CycledKeys(len(jpegs), 2**62), batch_size,
                               resolution, num_layers=2, magnitude=magnitude, num_threads=1, seed=seed))
    try:
        next(batches)  # warm-up: building the pipeline and the first batch
        count, cpu, wall = 0, time.process_time(), time.perf_counter()
        while True:
            count += len(next(batches)["label"])
            cpu_elapsed = time.process_time() - cpu
            if cpu_elapsed >= min_seconds:
                return count / cpu_elapsed, count / (time.perf_counter() - wall)
    finally:
        batches.close()


def dali_version():
    """DALI's version when it is installed, else None."""
    try:
        import nvidia.dali
    except ImportError:
        return None
    return nvidia.dali.__version__


def _run(payload: bytes, transform):
    image = data.decode(payload)
    return image if transform is None else transform(image)


def bench_data(images: str | None = None, count: int = 64, resolution: int = 160, magnitude: float = 10.0,
               min_seconds: float = 5.0, seed: int = 0) -> dict:
    if images is not None:
        jpegs = read_jpegs(Path(images), count)
        source = f"{len(jpegs)} images from {images}"
    else:
        jpegs = synthetic_jpegs(count, seed=seed)
        source = f"{count} synthetic 500x375 JPEGs (quality 90)"
    if not jpegs:
        raise UserError(f"no images to benchmark in {images}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one DataLoader worker
    try:
        random.seed(seed)
        torch.manual_seed(seed)
        rates = {name: measure(jpegs, t, min_seconds) for name, t in pipelines(resolution, magnitude).items()}
    finally:
        torch.set_num_threads(threads)
    version = dali_version()
    dali = None
    if version is not None:
        cpu_rate, wall_rate = measure_dali(jpegs, resolution, magnitude, min_seconds, seed)
        dali = {"version": version, "threads": 1, "images_per_cpu_s": round(cpu_rate, 1),
                "images_per_wall_s": round(wall_rate, 1)}
    mean_bytes = sum(map(len, jpegs)) / len(jpegs)
    return {"source": source, "mean_jpeg_kb": round(mean_bytes / 1024, 1), "resolution": resolution,
            "magnitude": magnitude, "load_average": round(os.getloadavg()[0], 1), "cpu_count": os.cpu_count(),
            "images_per_cpu_s_per_worker": {k: round(v[0], 1) for k, v in rates.items()},
            "images_per_wall_s_per_worker": {k: round(v[1], 1) for k, v in rates.items()}, "dali": dali}


def print_report(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, indent=2))
        return
    print(f"data loading, one worker (1 process, 1 thread): {result['source']}, mean {result['mean_jpeg_kb']} KB, "
          f"train transform at {result['resolution']} px, RandAugment N=2 M={result['magnitude']:g}")
    print(f"machine: {result['cpu_count']} CPUs, load average {result['load_average']}")
    print(f"  {'pipeline':<10}{'images/CPU-s':>14}{'images/wall-s':>15}")
    for name, rate in result["images_per_cpu_s_per_worker"].items():
        print(f"  {name:<10}{rate:>14.1f}{result['images_per_wall_s_per_worker'][name]:>15.1f}")
    dali = result.get("dali")
    if dali is None:
        print("  dali-cpu: NVIDIA DALI not installed (pip install -e '.[dali]')")
    else:
        print(f"  {'dali-cpu':<10}{dali['images_per_cpu_s']:>14.1f}{dali['images_per_wall_s']:>15.1f}"
              f"   DALI {dali['version']}, 1 thread, CPU-s of the whole process")
