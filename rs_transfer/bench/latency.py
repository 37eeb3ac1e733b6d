"""Training-step latency, peak memory and inference throughput, measured with the paper's protocol.

Protocol (PAPER.md section 2, Table 7): one training step is forward + cross-entropy + backward + SGD step on
random images; start at batch 128 and halve on out-of-memory until the step fits; report seconds per 128 images
(median step time x 128 / batch). Warm-up steps (cuDNN autotuning, allocator growth) are not timed; every timed
step is bracketed by `torch.cuda.synchronize()`; the median of the repeats is reported.
"""

import gc
import logging
import math
import platform
import statistics
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F

from rs_transfer.bench.specs import BenchSpec, build_model
from rs_transfer.engine.device import resolve_device
from rs_transfer.errors import UserError

log = logging.getLogger(__name__)

PAPER_BATCH = 128
DTYPES = ("fp32", "tf32", "bf16")


@dataclass
class LatencyResult:
    model: str
    resolution: int
    device: str  # the machine, e.g. "NVIDIA H100 80GB HBM3" or "cpu: AMD EPYC (2 threads)"
    dtype: str
    channels_last: bool
    start_batch: int
    batch: int  # the batch the training step fitted at
    train_step_s: float  # median seconds of one step at `batch`
    train_s_per_128: float  # the paper's number: train_step_s * 128 / batch
    train_img_s: float
    infer_batch: int
    infer_img_s: float
    peak_mem_gb: float | None  # GiB, torch.cuda.max_memory_allocated over warm-up + timed steps; None on CPU
    warmup: int
    repeats: int
    train_step_times_s: list = field(default_factory=list)
    torch_version: str = torch.__version__
    compiled: bool = False  # torch.compile'd model (`--compile`); the steps timed after compiling
    compile_backend: str | None = None  # its backend: inductor (the default), aot_eager, ...
    compile_s: float | None = None  # seconds of the first training step, which compiles (None: eager)

    @property
    def spec(self) -> str:
        return f"{self.model}@{self.resolution}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "results") -> "LatencyResult":
        """A result read back (table7.json, `bench latency --json` output). Raises UserError naming `source` for
        anything but an object with these fields of these types (a hand edit would otherwise fail in formatting)."""
        if not isinstance(data, dict):
            raise UserError(f"{source}: a latency result is a JSON object, not a {type(data).__name__}")
        try:
            result = cls(**data)
        except TypeError as error:
            raise UserError(f"{source}: not a latency result ({error})") from None
        for f in fields(cls):
            value = getattr(result, f.name)
            if not _of_type(value, f.type):
                raise UserError(f"{source}: {result.model!r}: {f.name} = {value!r} is not a {f.type}")
        return result


def _of_type(value, kind) -> bool:
    """Whether a JSON value fits a LatencyResult field type: numbers finite, ints not bools, floats may be ints."""
    if kind is float | None:
        return value is None or _of_type(value, float)
    if kind is str | None:
        return value is None or isinstance(value, str)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"cpu: {cpu} ({torch.get_num_threads()} threads)"


def timing_options(device=None, dtype="fp32", channels_last=False, batch=None, warmup=None, repeats=None,
                   compile=None) -> dict:
    """`measure` keyword arguments from CLI values; unset ones get the device's defaults (the paper's on GPU)."""
    device = resolve_device(device)
    gpu = device.type == "cuda"
    options = {
        "device": device,
        "dtype": dtype,
        "channels_last": channels_last,
        "compile": compile,
        "start_batch": batch if batch is not None else (PAPER_BATCH if gpu else 8),  # CPU: minutes, not hours
        "warmup": warmup if warmup is not None else (5 if gpu else 1),
        "repeats": repeats if repeats is not None else (20 if gpu else 3),
    }
    if options["start_batch"] < 1 or options["warmup"] < 0 or options["repeats"] < 1:
        raise UserError("--batch and --repeats must be at least 1, --warmup at least 0")
    return options


@contextmanager
def precision(dtype: str):
    """fp32 means true fp32 (the paper's V100 has no TF32); tf32 lets convs and matmuls use TF32 on Ampere+.

    Also turns on cuDNN autotuning (the warm-up steps absorb it); the previous settings come back on exit.
    """
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    flags = (torch.backends.cuda.matmul, "allow_tf32"), (torch.backends.cudnn, "allow_tf32"), \
        (torch.backends.cudnn, "benchmark")
    saved = [getattr(owner, name) for owner, name in flags]
    for (owner, name), value in zip(flags, (dtype == "tf32", dtype == "tf32", True)):
        setattr(owner, name, value)
    try:
        yield
    finally:
        for (owner, name), value in zip(flags, saved):
            setattr(owner, name, value)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    # Only the CUDA caching allocator needs this; on CPU a full gc.collect costs ~1 s and frees nothing extra.
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def run_halving(run_at_batch, start_batch: int, free=lambda: None, what: str = "step"):
    """Call `run_at_batch(batch)` from `start_batch`, halving on out-of-memory; returns (batch, its result)."""
    batch = start_batch
    while batch >= 1:
        try:
            return batch, run_at_batch(batch)
        except torch.cuda.OutOfMemoryError:
            pass  # free memory outside the handler: the traceback still holds the step's tensors here
        free()
        log.info("  %s out of memory at batch %d, halving", what, batch)
        batch //= 2
    raise UserError(f"the {what} does not fit in memory even at batch 1")


def time_steps(step, warmup: int, repeats: int, sync=lambda: None, timer=time.perf_counter) -> list:
    """Seconds of each of `repeats` timed calls of `step`, after `warmup` untimed ones."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        sync()
        start = timer()
        step()
        sync()
        times.append(timer() - start)
    return times


def autocast(device: torch.device, dtype: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")


def random_batch(batch: int, resolution: int, num_classes: int, device, channels_last: bool):
    images = torch.randn(batch, 3, resolution, resolution, device=device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, torch.randint(0, num_classes, (batch,), device=device)


def train_step_fn(model, images, labels, device: torch.device, dtype: str):
    """One SGD training step on a fixed batch, as a closure (weights stay fp32; bf16 is autocast)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=4e-5)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, dtype):
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()

    return step


def infer_step_fn(model, images, device: torch.device, dtype: str):
    def step():
        with torch.inference_mode(), autocast(device, dtype):
            model(images)

    return step


def measure(
    spec: BenchSpec,
    device: torch.device,
    dtype: str = "fp32",
    channels_last: bool = False,
    compile: str | None = None,
    start_batch: int = PAPER_BATCH,
    warmup: int = 5,
    repeats: int = 20,
    num_classes: int = 1000,
    build=build_model,
    timer=time.perf_counter,
) -> LatencyResult:
    with precision(dtype):
        return _measure(spec, device, dtype, channels_last, start_batch, warmup, repeats, num_classes, build, timer,
                        compile)


def _measure(spec, device, dtype, channels_last, start_batch, warmup, repeats, num_classes, build, timer,
             compile=None):
    with torch.device(device):
        model = build(spec.name, num_classes=num_classes)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    # Compiled: the first step of each batch size compiles (its time reported apart as compile_s); the warm-up and
    # timed steps run the compiled graph, as a long training run does after its first steps.
    network = torch.compile(model, backend=compile) if compile else model
    first_step_s = []

    def sync():
        synchronize(device)

    def free():
        model.zero_grad(set_to_none=True)
        free_memory(device)

    def train_at(batch):
        images, labels = random_batch(batch, spec.resolution, num_classes, device, channels_last)
        model.train()
        step = train_step_fn(network, images, labels, device, dtype)
        started = timer()
        step()  # the first step allocates gradients and momentum (and compiles): out-of-memory shows up here, untimed
        sync()
        first_step_s.append(timer() - started)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = time_steps(step, warmup, repeats, sync, timer)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        return times, peak

    log.info("%s: training step from batch %d on %s, %s%s%s", spec, start_batch, device_name(device), dtype,
             ", channels-last" if channels_last else "", ", compiled" if compile else "")
    batch, (times, peak) = run_halving(train_at, start_batch, free, what=f"{spec} training step")
    free()

    def infer_at(infer_batch):
        images, _ = random_batch(infer_batch, spec.resolution, num_classes, device, channels_last)
        model.eval()
        step = infer_step_fn(network, images, device, dtype)
        if compile:
            step()  # untimed: a compiled model compiles its inference graph here
        return time_steps(step, warmup, repeats, sync, timer)

    infer_batch, infer_times = run_halving(infer_at, batch, free, what=f"{spec} inference")
    step_s = statistics.median(times)
    result = LatencyResult(
        model=spec.name,
        resolution=spec.resolution,
        device=device_name(device),
        dtype=dtype,
        channels_last=channels_last,
        start_batch=start_batch,
        batch=batch,
        train_step_s=step_s,
        train_s_per_128=step_s * PAPER_BATCH / batch,
        train_img_s=batch / step_s,
        infer_batch=infer_batch,
        infer_img_s=infer_batch / statistics.median(infer_times),
        peak_mem_gb=peak,
        warmup=warmup,
        repeats=repeats,
        train_step_times_s=times,
        compiled=bool(compile),
        compile_backend=compile,
        compile_s=first_step_s[-1] if compile else None,
    )
    del model, network
    free_memory(device)
    return result


def format_results(results) -> str:
    header = (f"{'model':<22}{'batch':>6}{'s/128 img':>11}{'train img/s':>13}{'infer img/s':>13}"
              f"{'peak mem GB':>13}")
    lines = [header, "-" * len(header)]
    for r in results:
        mem = f"{r.peak_mem_gb:.2f}" if r.peak_mem_gb is not None else "n/a (CPU)"
        lines.append(f"{r.spec:<22}{r.batch:>6}{r.train_s_per_128:>11.3f}{r.train_img_s:>13.1f}"
                     f"{r.infer_img_s:>13.1f}{mem:>13}")
    if results:
        r = results[0]
        compiled = f", compiled ({r.compile_backend}; first step {r.compile_s:.1f} s)" if r.compiled else ""
        lines.append(f"device: {r.device}; {r.dtype}{', channels-last' if r.channels_last else ''}{compiled}; "
                     f"median of {r.repeats} steps after {r.warmup} warm-up; start batch {r.start_batch}")
    return "\n".join(lines)
