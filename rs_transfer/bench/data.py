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
- rs-tf-fast: rs-tf with `data.fast_decode` (transforms.ReducedDecodeCrop: the crop box drawn from the header,
  then the JPEG decoded at 1/2, 1/4 or 1/8 scale where the box keeps >= S px): the same draws, the same boxes
- decode: JPEG decode and RGB conversion alone, the floor under all three
- crop, crop-fast: decode + RandomResizedCrop alone, full decode (rs-tf's first step) and reduced (rs-tf-fast's):
  the share of the cost the reduced decode acts on. `fast_decode` in JSON gives the share of crops decoded
  reduced and the PSNR of those crops against the full decode's, same boxes (how much the pixels differ)
`--backend dali` (bench_dali_feeder) measures instead what the DALI loader costs the training thread: its CPU time
per batch with the Python feeder on that thread and in feeder processes (DALI's parallel external source), and
the feeder's CPU time per sample.
Pipelines are measured interleaved, one pass through the images each in turn until each has `min_seconds` of CPU,
so a change of load on a shared machine falls on all of them alike.
- dali-cpu (when NVIDIA DALI is installed, `pip install -e ".[dali]"`): rs_transfer.pretrain.dali's pipeline, the
  same train transform on DALI's CPU operators with one DALI thread, from the same bytes to the same uint8 batch.
  Its rate is images per CPU-second of the whole process (DALI's executor and the Python callback included), the
  per-core figure to set beside a worker's. In JSON it is its own entry `dali` (null when DALI is not installed),
  not one of the per-worker pipelines: DALI runs its own threads instead of DataLoader workers.
"""

import io
import json
import math
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
    """name -> a function from JPEG bytes to what that pipeline ships (see the module docstring)."""
    from timm.data import create_transform
    from torchvision.transforms import InterpolationMode, v2

    timm_transform = create_transform(resolution, is_training=True, auto_augment=f"rand-m{magnitude:g}-n2",
                                      interpolation="bicubic")
    fast = transforms.train_transform(resolution, "tf", 2, magnitude, fast_decode=True)
    crop = v2.RandomResizedCrop(resolution, ratio=transforms.RATIO, interpolation=InterpolationMode.BICUBIC)
    return {
        "rs-tf": _decoded(transforms.train_transform(resolution, "tf", 2, magnitude)),
        "rs-tf-fast": lambda payload: fast.augment(fast.decode(payload)),
        "rs-timm": _decoded(transforms.train_transform(resolution, "timm", 2, magnitude)),
        "timm": _decoded(timm_transform),
        "decode": data.decode,
        "crop": _decoded(crop),
        "crop-fast": transforms.ReducedDecodeCrop(resolution),
    }


def _decoded(transform):
    return lambda payload: transform(data.decode(payload))


def measure(jpegs: list, runs: dict, min_seconds: float) -> dict:
    """name -> (images per CPU second, images per wall second) of each function in `runs` over `jpegs`, measured
    interleaved: one pass through `jpegs` per function in turn, until each has `min_seconds` of CPU.

    CPU time is the figure to plan with: a worker with a core to itself runs at that rate, while wall time on a
    shared machine also counts the time other processes held the core.
    """
    for run in runs.values():
        for payload in jpegs[:4]:  # warm-up: first-call costs (imports, lookup tables)
            run(payload)
    spent = {name: [0, 0.0, 0.0] for name in runs}  # images, CPU s, wall s
    while min(cpu for _, cpu, _ in spent.values()) < min_seconds:
        for name, run in runs.items():
            cpu, wall = time.process_time(), time.perf_counter()
            for payload in jpegs:
                run(payload)
            total = spent[name]
            total[0] += len(jpegs)
            total[1] += time.process_time() - cpu
            total[2] += time.perf_counter() - wall
    return {name: (count / max(cpu, 1e-9), count / max(wall, 1e-9)) for name, (count, cpu, wall) in spent.items()}


def fast_decode_difference(jpegs: list, resolution: int, draws: int = 4) -> dict:
    """How the reduced decode changes the pixels: over `draws` crops per image (the same torch draws, so the same
    boxes), the share of crops decoded reduced, and the PSNR (dB, peak 255) of those crops against the full
    decode + bicubic resize (None when no crop was reduced)."""
    from PIL import Image
    from torchvision.transforms import InterpolationMode, v2

    full = v2.Compose([v2.RandomResizedCrop(resolution, ratio=transforms.RATIO,
                                            interpolation=InterpolationMode.BICUBIC), v2.PILToTensor()])
    fast = transforms.ReducedDecodeCrop(resolution)
    squared, reduced, total = 0.0, 0, 0
    for draw in range(draws):
        for number, payload in enumerate(jpegs):
            torch.manual_seed(draw * len(jpegs) + number)
            reference = full(data.decode(payload)).double()
            torch.manual_seed(draw * len(jpegs) + number)
            with Image.open(io.BytesIO(payload)) as header:
                box = fast.crop.make_params([header])
                factor = transforms.jpeg_reduction(header, min(box["width"], box["height"]), resolution)
            torch.manual_seed(draw * len(jpegs) + number)
            pixels = v2.functional.pil_to_tensor(fast(payload)).double()
            total += 1
            if factor > 1:
                reduced += 1
                squared += float(((pixels - reference) ** 2).mean())
    psnr = None if reduced == 0 else round(10 * math.log10(255 ** 2 / max(squared / reduced, 1e-12)), 1)
    return {"reduced_share": round(reduced / total, 3), "psnr_db_reduced": psnr}


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


def measure_dali_feeder(jpegs: list, resolution: int, magnitude: float, min_seconds: float, seed: int,
                        batch_size: int = 64, workers: int = 2) -> dict:
    """The DALI loader's cost to the thread that runs it (the training thread), with its Python feeder (file reads,
    headers, random parameters) on that thread (py_workers=0, the way it ran before) and in `workers` forked
    processes (DALI's parallel external source, what the trainer runs): name -> main-thread CPU ms per batch,
    interleaved batch by batch until each has `min_seconds` of wall time. DALI's own threads (decode,
    augmentation; 1 here) are not the main thread's. (No wall figure: each pipeline decodes ahead while the other
    runs, so interleaved wall times say nothing.)"""
    from rs_transfer.pretrain.dali import DaliBatches

    def loader(py_workers: int):
        return iter(DaliBatches(lambda index: (jpegs[index], 0), CycledKeys(len(jpegs), 2**62), batch_size,
                                resolution, num_layers=2, magnitude=magnitude, num_threads=1, seed=seed,
                                py_workers=py_workers, py_start_method="fork"))

    loaders = {"main-thread feeder": loader(0), f"{workers} feeder processes": loader(workers)}
    try:
        for batches in loaders.values():
            next(batches)  # warm-up: building the pipeline, starting the workers, the first batch
        spent = {name: [0, 0.0, 0.0] for name in loaders}  # batches, main-thread CPU s, wall s
        while min(wall for *_, wall in spent.values()) < min_seconds:
            for name, batches in loaders.items():
                cpu, wall = time.thread_time(), time.perf_counter()
                next(batches)
                total = spent[name]
                total[0] += 1
                total[1] += time.thread_time() - cpu
                total[2] += time.perf_counter() - wall
    finally:
        for batches in loaders.values():
            batches.close()
    return {name: 1000 * cpu / count for name, (count, cpu, _) in spent.items()}


def feeder_cost(jpegs: list, resolution: int, magnitude: float, seed: int, batch_size: int = 64,
                min_seconds: float = 1.0) -> float:
    """CPU microseconds per sample of the DALI feeder's Python work (pretrain.dali.KeySource: bytes, header,
    random parameters), in this process: what the feeder processes take off the training thread."""
    from types import SimpleNamespace

    from rs_transfer.pretrain.dali import KeySource

    source = KeySource(lambda index: (jpegs[index], 0), CycledKeys(len(jpegs), 2**62), batch_size, resolution,
                       (0.08, 1.0), 2, magnitude, seed)
    count, cpu = 0, time.process_time()
    while time.process_time() - cpu < min_seconds:
        source(SimpleNamespace(iteration=count))
        count += 1
    return 1e6 * (time.process_time() - cpu) / (count * batch_size)


def bench_dali_feeder(images: str | None = None, count: int = 64, resolution: int = 160, magnitude: float = 10.0,
                      min_seconds: float = 5.0, seed: int = 0, batch_size: int = 64) -> dict:
    """`bench data --backend dali`: the DALI loader's main-thread CPU time per batch, feeder on the main thread
    against feeder processes (interleaved, one run), and the feeder's cost per sample; CPU-only DALI pipeline."""
    version = dali_version()
    if version is None:
        raise UserError("bench data --backend dali needs NVIDIA DALI, which is not installed: pip install -e '.[dali]'")
    jpegs, source = _jpegs(images, count, seed)
    times = measure_dali_feeder(jpegs, resolution, magnitude, min_seconds, seed, batch_size)
    return {"source": source, "resolution": resolution, "batch_size": batch_size, "dali_version": version,
            "load_average": round(os.getloadavg()[0], 1), "cpu_count": os.cpu_count(),
            "main_thread_cpu_ms_per_batch": {k: round(v, 2) for k, v in times.items()},
            "feeder_cpu_us_per_sample": round(feeder_cost(jpegs, resolution, magnitude, seed, batch_size), 1)}


def print_dali_report(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, indent=2))
        return
    print(f"DALI {result['dali_version']} CPU pipeline, 1 DALI thread, batch {result['batch_size']} at "
          f"{result['resolution']} px: {result['source']}")
    print(f"machine: {result['cpu_count']} CPUs, load average {result['load_average']}")
    print(f"  {'feeder':<22}{'main-thread CPU ms/batch':>26}")
    for name, cpu in result["main_thread_cpu_ms_per_batch"].items():
        print(f"  {name:<22}{cpu:>26.2f}")
    print(f"  feeder's Python work: {result['feeder_cpu_us_per_sample']} CPU-us per sample")


def _jpegs(images: str | None, count: int, seed: int) -> tuple:
    """(JPEG bytes, where they come from) for the benchmarks: `count` files of folder `images`, else synthetic."""
    if images is not None:
        jpegs = read_jpegs(Path(images), count)
        source = f"{len(jpegs)} images from {images}"
    else:
        jpegs = synthetic_jpegs(count, seed=seed)
        source = f"{count} synthetic 500x375 JPEGs (quality 90)"
    if not jpegs:
        raise UserError(f"no images to benchmark in {images}")
    return jpegs, source


def dali_version():
    """DALI's version when it is installed, else None."""
    try:
        import nvidia.dali
    except ImportError:
        return None
    return nvidia.dali.__version__


def bench_data(images: str | None = None, count: int = 64, resolution: int = 160, magnitude: float = 10.0,
               min_seconds: float = 5.0, seed: int = 0) -> dict:
    jpegs, source = _jpegs(images, count, seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one DataLoader worker
    try:
        random.seed(seed)
        torch.manual_seed(seed)
        rates = measure(jpegs, pipelines(resolution, magnitude), min_seconds)
        difference = fast_decode_difference(jpegs, resolution)
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
            "images_per_wall_s_per_worker": {k: round(v[1], 1) for k, v in rates.items()},
            "fast_decode": difference, "dali": dali}


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
    rates, difference = result["images_per_cpu_s_per_worker"], result.get("fast_decode")
    if difference is not None and "rs-tf-fast" in rates:
        psnr = difference["psnr_db_reduced"]
        print(f"  fast decode: rs-tf-fast / rs-tf {rates['rs-tf-fast'] / rates['rs-tf']:.2f}x, crop-fast / crop "
              f"{rates['crop-fast'] / rates['crop']:.2f}x; {difference['reduced_share']:.0%} of crops decoded reduced"
              + (f", PSNR {psnr} dB against the full decode" if psnr is not None else ""))
    dali = result.get("dali")
    if dali is None:
        print("  dali-cpu: NVIDIA DALI not installed (pip install -e '.[dali]')")
    else:
        print(f"  {'dali-cpu':<10}{dali['images_per_cpu_s']:>14.1f}{dali['images_per_wall_s']:>15.1f}"
              f"   DALI {dali['version']}, 1 thread, CPU-s of the whole process")
