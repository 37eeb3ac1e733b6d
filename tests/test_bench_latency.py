"""The latency protocol: halving on out-of-memory, normalisation to 128 images, warm-up and median, on CPU."""

import statistics

import pytest
import torch
from torch import nn

from rs_transfer.bench.latency import (
    format_results, measure, precision, run_halving, time_steps, timing_options,
)
from rs_transfer.bench.specs import BenchSpec, build_model, parse_spec, parse_specs
from rs_transfer.engine.device import resolve_device
from rs_transfer.errors import UserError


class OOMAbove(nn.Module):
    """A tiny classifier that raises CUDA's out-of-memory error above `limit` images, recording every batch."""

    def __init__(self, limit: int, num_classes: int):
        super().__init__()
        self.limit, self.batches = limit, []
        self.fc = nn.Linear(3, num_classes)

    def forward(self, x):
        self.batches.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise torch.cuda.OutOfMemoryError("fake: CUDA out of memory")
        return self.fc(x.mean(dim=(2, 3)))


class Clock:
    """A fake timer: every call moves time on by `tick` seconds."""

    def __init__(self, tick: float):
        self.now, self.tick = 0.0, tick

    def __call__(self):
        self.now += self.tick
        return self.now


def test_run_halving_halves_until_it_fits():
    tried, freed = [], []

    def run_at(batch):
        tried.append(batch)
        if batch > 20:
            raise torch.cuda.OutOfMemoryError("fake")
        return batch * 10

    assert run_halving(run_at, 128, free=lambda: freed.append(1)) == (16, 160)
    assert tried == [128, 64, 32, 16]
    assert len(freed) == 3


def test_run_halving_gives_up_below_batch_one():
    def never(batch):
        raise torch.cuda.OutOfMemoryError("fake")

    with pytest.raises(UserError, match="even at batch 1"):
        run_halving(never, 4)


def test_run_halving_lets_other_errors_through():
    def broken(batch):
        raise ValueError("a bug, not memory")

    with pytest.raises(ValueError):
        run_halving(broken, 8)


def test_measure_with_fake_oom_normalises_to_128_images():
    models = []

    def build(name, num_classes):
        models.append(OOMAbove(limit=16, num_classes=num_classes))
        return models[-1]

    result = measure(BenchSpec("fake", 8), torch.device("cpu"), start_batch=128, warmup=2, repeats=3,
                     num_classes=10, build=build, timer=Clock(0.5))
    assert result.batch == 16 and result.infer_batch == 16
    assert result.train_step_times_s == [0.5, 0.5, 0.5]
    assert result.train_step_s == 0.5
    assert result.train_s_per_128 == 0.5 * 128 / 16 == 4.0
    assert result.train_img_s == 32.0 and result.infer_img_s == 32.0
    assert result.peak_mem_gb is None  # not measured on CPU
    # training: 128, 64, 32 fail, then 16 x (1 first step + 2 warm-up + 3 timed); inference: 2 + 3 at 16
    assert models[0].batches == [128, 64, 32] + [16] * 6 + [16] * 5
    lines = format_results([result]).splitlines()
    assert lines[2].split() == ["fake@8", "16", "4.000", "32.0", "32.0", "n/a", "(CPU)"]
    assert lines[3].startswith("device: cpu") and "start batch 128" in lines[3]


def test_time_steps_excludes_warmup_and_takes_the_median():
    clock = Clock(0.0)
    durations = iter([100.0, 50.0, 3.0, 1.0, 2.0, 9.0, 2.5])  # two slow warm-up steps, then five timed

    def step():
        clock.now += next(durations)

    times = time_steps(step, warmup=2, repeats=5, timer=clock)
    assert times == [3.0, 1.0, 2.0, 9.0, 2.5]
    assert statistics.median(times) == 2.5


def test_specs_parse_and_reject():
    assert parse_specs(["rs50@160,efficientnet_b1@240", "rs152@224"]) == [
        BenchSpec("rs50", 160), BenchSpec("efficientnet_b1", 240), BenchSpec("rs152", 224)]
    for bad in ("rs50", "rs50@", "@160", "rs50@abc", "rs50@0"):
        with pytest.raises(UserError, match="NAME@RES"):
            parse_spec(bad)
    with pytest.raises(UserError, match="unknown model 'efficentnet_b0'"):
        build_model("efficentnet_b0")


def test_device_and_dtype_errors():
    with pytest.raises(UserError, match="unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA device"):
            resolve_device("cuda")
    with pytest.raises(UserError, match="unknown dtype"):
        with precision("fp16"):
            pass
    before = torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark
    with precision("fp32"):
        assert not torch.backends.cudnn.allow_tf32 and torch.backends.cudnn.benchmark
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark) == before


def test_cpu_defaults_are_small_and_labelled():
    options = timing_options("cpu")
    assert options["device"] == torch.device("cpu")
    assert (options["start_batch"], options["warmup"], options["repeats"]) == (8, 1, 3)
    assert timing_options("cpu", batch=128, warmup=0, repeats=20)["start_batch"] == 128
    with pytest.raises(UserError, match="at least 1"):
        timing_options("cpu", batch=0)


def test_compile_times_compiled_steps_and_reports_the_compiling_step_apart():
    from torch._dynamo.utils import counters

    def build(name, num_classes):
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(4, num_classes))

    torch._dynamo.reset()
    counters.clear()
    result = measure(BenchSpec("tiny", 16), torch.device("cpu"), compile="eager", start_batch=2, warmup=1, repeats=2,
                     num_classes=3, build=build)
    assert counters["stats"]["unique_graphs"] >= 2  # the training and the inference graphs were captured
    assert result.compiled and result.compile_backend == "eager" and result.compile_s > 0
    assert "compiled (eager; first step" in format_results([result]).splitlines()[-1]
    eager = measure(BenchSpec("tiny", 16), torch.device("cpu"), start_batch=2, warmup=1, repeats=2, num_classes=3,
                    build=build)
    assert not eager.compiled and eager.compile_s is None and eager.compile_backend is None
    torch._dynamo.reset()
