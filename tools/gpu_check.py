"""The one-call GPU check: prepare a wheel folder here, then measure on a GPU machine without network.

    python tools/gpu_check.py prepare [--python-version 3.11]   # here, with pip's index: gpu_check/wheels
    bash tools/gpu_check.sh [run options]                       # there, from the repository root

`run` installs gpu_check/wheels into gpu_check/site (only the wheels whose distribution that Python lacks, and
always this package) and prints one JSON object: end-to-end pretraining img/s from a JPEG folder (PyTorch loader
with `data.num_workers=auto`, and `data.backend=dali` where DALI can be imported, else null with the reason), its
peak memory and the evaluation and checkpoint seconds of its last step, the model-only img/s of `bench latency`
eager and compiled and their ratios, video clips/s (training run, model alone, loader alone) and a few Table 7
rows in bf16 and fp32; its `goal` object gathers the figures the 4-hour RS-50 goal needs (GOAL_KEYS, each
documented in docs/benchmarks.md). Every part runs in its own
subprocess with its own timeout and reports its own `error`, so one failure hides no other figure; all parts share
a budget (`--budget-s`, 450 s by default) so the whole check ends within 8 minutes. `--tiny --device cpu` runs the
same parts with tiny settings (the tests do).

The data are generated on the device, not carried: the 60 MiB that travel with the working tree are nearly all
wheels (av alone is 34 MiB), while the JPEG folder would be ~95 MB (1400 JPEGs of 70 kB at 500x375) and takes a
second or two to write with 14 processes; the generators are this package's own, so every machine gets the same
files.

Only the standard library is imported at module level: `run` starts on a Python that has torch, torchvision and
timm but not yet this package or its other dependencies. Work that needs them runs in a subprocess whose
PYTHONPATH starts with the site folder.
"""

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DIR = REPO / "gpu_check"
LIMIT_MIB = 60  # what travels with the working tree (the device tool carries 64 MiB in all)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
# What the device's torch, torchvision and timm bring with them (their requirements, recursively).
PROVIDED_BY = ("torch", "torchvision", "timm")
# Distributions the check's commands import that PROVIDED_BY does not bring, and who imports them.
# tests/test_gpu_check.py runs every part with all else hidden, so a missing or unused entry fails there.
DEVICE_WHEELS = {
    "omegaconf": "rs_transfer.config",
    "wids": "rs_transfer.pretrain.shards (wids.wids_mmtar)",
    "tensorboard": "the engine's SummaryWriter (torch.utils.tensorboard)",
    "protobuf": "tensorboard's event files",
    "absl-py": "tensorboard",
    "av": "video decoding and the generated videos",
    "matplotlib": "bench table7's pareto.png",
    "fonttools": "matplotlib",
    "kiwisolver": "matplotlib",
    "pyparsing": "matplotlib",
    "cycler": "matplotlib",
    "python-dateutil": "matplotlib",
    "torchmetrics": "top-k accuracy of the pretrain and video evaluators (engine/classification.py)",
    "lightning-utilities": "torchmetrics",
}
OWN_WHEEL = "rs_transfer"


def log(message: str) -> None:
    print(f"[gpu_check] {message}", file=sys.stderr, flush=True)


def normalise(name: str) -> str:
    return name.lower().replace("-", "_").replace(".", "_")


def provided_distributions(roots=PROVIDED_BY) -> set:
    """Normalised names of the distributions installed here that `roots` require, recursively (no extras)."""
    from importlib.metadata import PackageNotFoundError, requires

    from packaging.requirements import Requirement

    seen, todo = set(), list(roots)
    while todo:
        name = normalise(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            requirements = requires(name) or []
        except PackageNotFoundError:
            continue
        for text in requirements:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return seen


def top_level_modules(distributions) -> set:
    """The importable top-level names of installed distributions (normalised names)."""
    from importlib.metadata import packages_distributions

    wanted = {normalise(d) for d in distributions}
    return {module for module, owners in packages_distributions().items()
            if any(normalise(owner) in wanted for owner in owners)}


def pip(*args: str, quiet: bool = True) -> None:
    command = [sys.executable, "-m", "pip", *args, *(["-q"] if quiet else [])]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"error: {' '.join(command)} failed:\n{done.stderr[-3000:]}")


# --- prepare (here) -------------------------------------------------------------------------------------------

def build_own_wheel(out: Path) -> Path:
    """This package's wheel, built from a clean copy of the working tree (a stale build/ could add old files)."""
    import importlib.util

    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "src"
        source.mkdir()
        for name in ("pyproject.toml", "setup.py", "README.md"):
            shutil.copy2(REPO / name, source / name)
        shutil.copytree(REPO / "rs_transfer", source / "rs_transfer", ignore=shutil.ignore_patterns("__pycache__"))
        isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
        pip("wheel", "--no-deps", *isolation, "-w", str(out), str(source))
    return next(out.glob(f"{OWN_WHEEL}-*.whl"))


def download_wheels(distributions, out: Path, python_version: str, platforms=PLATFORMS) -> None:
    """Binary wheels for the device (CPython `python_version`, Linux x86_64), each pinned to the version installed
    here, which the tests ran with."""
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for name in distributions:
        try:
            pins.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            pins.append(name)
    platform_args = [arg for platform in platforms for arg in ("--platform", platform)]
    pip("download", "--no-deps", "--only-binary=:all:", "--implementation", "cp", "--python-version",
        python_version, *platform_args, "-d", str(out), *pins)


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def prepare(out: Path, python_version: str, platforms=PLATFORMS, distributions=tuple(DEVICE_WHEELS)) -> dict:
    """Write OUT/*.whl and OUT/manifest.json (fresh); returns the manifest. Fails when OUT exceeds LIMIT_MIB."""
    started = time.perf_counter()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    build_own_wheel(out)
    if distributions:
        download_wheels(distributions, out, python_version, platforms)
    wheels = sorted(out.glob("*.whl"))
    manifest = {
        "python_version": python_version,
        "platforms": list(platforms),
        "wheels": [{"file": w.name, "bytes": w.stat().st_size} for w in wheels],
        "seconds": round(time.perf_counter() - started, 1),
    }
    manifest["total_mib"] = round((sum(w["bytes"] for w in manifest["wheels"]) + 2048) / 2**20, 2)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    if folder_bytes(out) > LIMIT_MIB * 2**20:
        raise SystemExit(f"error: {out} holds {folder_bytes(out) / 2**20:.1f} MiB, over the {LIMIT_MIB} MiB "
                         "that can travel with the working tree")
    return manifest


# --- install (on the device) ----------------------------------------------------------------------------------

def wheel_distribution(path: Path) -> str:
    return path.name.split("-")[0]


def wheel_fits(path: Path, version=sys.version_info) -> bool:
    """Whether a wheel's Python and ABI tags (NAME-VERSION-PY-ABI-PLATFORM.whl) fit this interpreter; pip checks
    the platform."""
    python_tags, abi = path.name[:-len(".whl")].split("-")[-3:-1]
    here = f"cp{version.major}{version.minor}"
    for tag in python_tags.split("."):
        if abi == "none" and tag in ("py3", f"py{version.major}{version.minor}", here):
            return True
        if abi == "abi3" and tag.startswith("cp3") and version.major == 3 and int(tag[3:]) <= version.minor:
            return True
        if abi == here and tag == here:
            return True
    return False


def install(wheels: Path, site: Path, timeout: float = 300) -> dict:
    """Install into a fresh SITE folder (put first on PYTHONPATH) this package's wheel and every wheel whose
    distribution this Python lacks; the machine's own packages (torch and its company) are never replaced. A wheel
    that does not fit (another Python, an older glibc) is left out and named: the parts that need it fail alone."""
    from importlib.metadata import PackageNotFoundError, version

    started = time.perf_counter()
    manifest_path = wheels / "manifest.json"
    if not manifest_path.is_file():
        raise PartError(f"{manifest_path} is missing: run `python tools/gpu_check.py prepare` where pip has an "
                        "index, and carry the folder")
    manifest = json.loads(manifest_path.read_text())
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    chosen, present, refused = [], {}, {}
    for path in sorted(wheels.glob("*.whl")):
        name = wheel_distribution(path)
        try:
            present[name] = version(name)
        except PackageNotFoundError:
            pass
        if name != OWN_WHEEL and name in present:
            continue
        if wheel_fits(path):
            chosen.append(path)
        else:
            refused[path.name] = f"built for another Python than {here}"
    present.pop(OWN_WHEEL, None)
    if site.exists():
        shutil.rmtree(site)
    site.mkdir(parents=True)
    has_pip = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode == 0
    if has_pip:
        refused.update(pip_install(chosen, site, timeout))
    else:
        for path in chosen:
            unpack_wheel(path, site)
    report = {"installed": [p.name for p in chosen if p.name not in refused], "already_present": present,
              "with": "pip" if has_pip else "unzip", "seconds": round(time.perf_counter() - started, 1)}
    if refused:
        report["not_installed"] = refused
    if manifest["python_version"] != here:
        report["warning"] = (f"the wheels were prepared for Python {manifest['python_version']}, this is {here}: "
                             f"rerun prepare with --python-version {here}")
    return report


def pip_install(paths: list, site: Path, timeout: float) -> dict:
    """{wheel: why} for the wheels pip refuses: all in one call, or one by one when that call fails (pip refuses
    the whole call for one wheel of an unsupported platform)."""
    deadline = time.time() + timeout
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--upgrade",
               "--target", str(site)]
    if subprocess.run([*command, *map(str, paths)], capture_output=True, timeout=timeout).returncode == 0:
        return {}
    refused = {}
    for path in paths:
        one = subprocess.run([*command, str(path)], capture_output=True, text=True,
                             timeout=max(1.0, deadline - time.time()))
        if one.returncode != 0:
            refused[path.name] = last_lines(one.stderr)
    return refused


def unpack_wheel(path: Path, site: Path) -> None:
    """What `pip install --target` does for a wheel without pip: purelib/platlib files into SITE, scripts left out."""
    with zipfile.ZipFile(path) as wheel:
        for member in wheel.infolist():
            parts = Path(member.filename).parts
            if parts[0].endswith(".data"):
                if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                    continue
                parts = parts[2:]
            target = site.joinpath(*parts)
            if member.is_dir():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(wheel.read(member))
            if member.external_attr >> 16 & 0o111:
                target.chmod(0o755)


# --- data generators (run in a subprocess, with the site on PYTHONPATH) ----------------------------------------

def _write_class(job: tuple) -> int:
    import numpy as np

    from rs_transfer.pretrain.synthetic import make_image

    root, split, split_index, label, classes, count, size, seed = job
    folder = Path(root) / split / f"n{label:08d}"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, split_index, label])
    written = 0
    for i in range(count):
        path = folder / f"{split}_{label:04d}_{i:05d}.jpg"
        make_image(label, classes, size, rng).save(path, format="JPEG", quality=90)  # as bench.data.synthetic_jpegs
        written += path.stat().st_size
    return written


def make_jpegs(root: Path, classes: int, train_per_class: int, val_per_class: int, size=(500, 375), seed: int = 0,
               processes: int = 1) -> dict:
    """ROOT/train/<class>/*.jpg and ROOT/val/<class>/*.jpg: the striped, noisy images of pretrain/synthetic.py at
    ImageNet's typical 500x375, JPEG quality 90. One generator per (split, class), so any process count writes the
    same files."""
    import multiprocessing

    started = time.perf_counter()
    jobs = [(str(root), split, index, label, classes, count, tuple(size), seed)
            for index, (split, count) in enumerate((("train", train_per_class), ("val", val_per_class)))
            for label in range(classes)]
    if processes > 1:
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            sizes = pool.map(_write_class, jobs)
    else:
        sizes = [_write_class(job) for job in jobs]
    return {"root": str(root), "classes": classes, "train_images": classes * train_per_class,
            "val_images": classes * val_per_class, "image_size": list(size), "mib": round(sum(sizes) / 2**20, 1),
            "seconds": round(time.perf_counter() - started, 1)}


def make_videos(root: Path, classes: int, train_per_class: int, val_per_class: int, seconds: int) -> dict:
    """A Kinetics class-folder layout of copies of one video from `bench video-data`'s seek test: 340x256 H.264,
    25 fps, a keyframe a second, noise on every frame (decoding costs what real footage does). The content does not
    matter for speed, so it is encoded once and copied."""
    from rs_transfer.bench.video_data import write_seek_video

    started = time.perf_counter()
    source = write_seek_video(root / "source.mp4", seconds=seconds)
    count = 0
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for label in range(classes):
            folder = root / split / f"class_{label:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                shutil.copyfile(source, folder / f"{split}_{i:04d}.mp4")
                count += 1
    source.unlink()
    return {"root": str(root), "videos": count, "seconds_each": seconds,
            "seconds": round(time.perf_counter() - started, 1)}


def video_model_only(device: str, model: str, frames: int, crop: int, batch: int, dtype: str, channels_last: bool,
                     warmup: int, repeats: int, num_classes: int = 400) -> dict:
    """Clips/s of the video training step without a loader: the engine's model (uint8 clips normalised on the
    device, cross-entropy), SGD, random clips; `bench latency`'s protocol (halve on out-of-memory, median)."""
    import torch

    from rs_transfer.bench.latency import (device_name, free_memory, precision, resolve_device, run_halving,
                                           synchronize, time_steps)
    from rs_transfer.config import load_config
    from rs_transfer.engine.device import to_channels_last
    from rs_transfer.engine.classification import Classifier
    from rs_transfer.video.config import VideoConfig
    from rs_transfer.video.task import build_net

    target = resolve_device(device)
    config = load_config(VideoConfig, None, [f"model.name={model}", "model.init=timm",
                                             f"model.num_classes={num_classes}"])
    classifier = Classifier(build_net(config), label_smoothing=0.0).to(target).train()
    if channels_last:
        to_channels_last(classifier)
    optimizer = torch.optim.SGD(classifier.parameters(), lr=1e-3, momentum=0.9, nesterov=True)

    def run_at(size: int) -> list:
        clips = torch.randint(0, 256, (size, 3, frames, crop, crop), dtype=torch.uint8, device=target)
        if channels_last:
            clips = clips.contiguous(memory_format=torch.channels_last_3d)
        labels = torch.randint(0, num_classes, (size,), device=target)

        def step():
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(target.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
                loss = classifier({"image": clips, "label": labels})["loss"]
            loss.backward()
            optimizer.step()

        step()  # allocates gradients and momentum: out-of-memory shows up here
        return time_steps(step, warmup, repeats, lambda: synchronize(target))

    def free():
        classifier.zero_grad(set_to_none=True)
        free_memory(target)

    with precision(dtype):
        fitted, times = run_halving(run_at, batch, free, what=f"3D {model} training step")
    step_s = statistics.median(times)
    return {"model": model, "clip_frames": frames, "crop": crop, "dtype": dtype, "channels_last": channels_last,
            "device": device_name(target), "batch": fitted, "step_s": round(step_s, 4),
            "clips_per_s": round(fitted / step_s, 2)}


def measured_run(argv: list, measures: Path) -> int:
    """`python -m rs_transfer ARGV` in this process, with what its records do not split apart measured beside it,
    written to MEASURES (JSON): the seconds of each evaluation, of each checkpoint on the training thread (the
    weights' finite check, state gathered, the previous write waited for, the copy to host memory) and of each
    checkpoint write in the background (serialise, fsync, rename), timed around the trainer's own methods
    (summary.json has only their sum with the waits, wall_s - train_s); and the end-to-end peak memory:
    torch.cuda.max_memory_allocated (weights, gradients, optimizer, EMA, activations, the evaluation; None without
    CUDA) and this process's peak resident set (VmHWM: ru_maxrss, pinned host buffers included; the loader workers
    are other processes and not in it)."""
    import resource

    import torch

    from rs_transfer.cli import main as cli_main
    from rs_transfer.engine.distributed import loader_workers
    from rs_transfer.engine.trainer import Trainer

    times = {"evaluate": [], "checkpoint_blocking": [], "checkpoint_write": []}

    def timed(name: str, method):
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                times[name].append(time.perf_counter() - started)  # list.append: safe from the writer's thread
        return wrapper

    Trainer._evaluate = timed("evaluate", Trainer._evaluate)
    Trainer._save = timed("checkpoint_blocking", Trainer._save)
    Trainer._write_step = timed("checkpoint_write", Trainer._write_step)
    code = cli_main(argv)
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    # what the run's loader started: its data.num_workers (`auto`) resolved here, as the trainer did (one process)
    setting = next((arg.split("=", 1)[1] for arg in argv if arg.startswith("data.num_workers=")), None)
    workers = None if setting is None else loader_workers(int(setting) if setting.isdigit() else setting)[0]
    measures.write_text(json.dumps({
        "loader_workers": workers,
        **{f"{name}_s": [round(t, 4) for t in values] for name, values in times.items()},
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None,
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30, 3),
    }) + "\n")
    return code


# --- run (on the device) --------------------------------------------------------------------------------------

class PartError(Exception):
    pass


@dataclass
class Settings:
    """What each part runs. The defaults are the GPU check; TINY is the CPU test of the same code."""

    device: str = "cuda"
    dtype: str = "bf16"  # pretraining amp, bench latency and the video runs
    model: str = "rs50"
    image_size: int = 160
    batch: int = 256  # pretraining and bench latency alike, so their ratio compares one batch
    steps: int = 160
    log_every: int = 20
    warmup_steps: int = 40  # log windows up to this step are left out (worker start-up, cuDNN autotuning)
    pretrain_workers: str = "auto"  # data.num_workers of the pretraining runs: the recipe's (cores - 1)
    workers: int = field(default_factory=lambda: max(1, (os.cpu_count() or 2) - 2))  # video runs and loader
    compile_backend: str = "inductor"  # model_only_compiled: `bench latency --compile BACKEND`
    classes: int = 10
    train_per_class: int = 130
    val_per_class: int = 10
    latency_warmup: int = 5
    latency_repeats: int = 20
    video_model: str = "rs50"
    clip_frames: int = 32
    frame_stride: int = 2
    crop: int = 224
    eval_size: int = 256
    video_batch: int = 32
    video_steps: int = 30
    video_log_every: int = 5
    video_warmup_steps: int = 10
    video_train_per_class: int = 24
    video_seconds: int = 10
    video_model_warmup: int = 3
    video_model_repeats: int = 10
    loader_clips: int = 200
    table7_rows: str = "rs50@160,efficientnet_b0@224,efficientnet_b1@240"
    table7_dtypes: tuple = ("bf16", "fp32")  # the table7_DTYPE parts run
    table7_batch: int | None = None  # None: the bench's default (128 on GPU)
    table7_warmup: int | None = None
    table7_repeats: int | None = None


TINY = Settings(
    device="cpu", dtype="fp32", model="rs26-w0.25", image_size=32, batch=8, steps=6, log_every=2, warmup_steps=2,
    workers=1, classes=2, train_per_class=8, val_per_class=2, latency_warmup=0, latency_repeats=2,
    # inductor would compile C++ on the CPU; eager runs dynamo's capture alone (10 CPU-s a run here against 16 with
    # aot_eager and 5.5 uncompiled: `bench latency --models rs26-w0.25@32 --device cpu --batch 8 --compile B`),
    # which keeps the tiny run within its old cost
    compile_backend="eager",
    video_model="rs26-w0.125", clip_frames=4, frame_stride=2, crop=32, eval_size=32, video_batch=2, video_steps=4,
    video_log_every=2, video_warmup_steps=2, video_train_per_class=2, video_seconds=1, video_model_warmup=0,
    video_model_repeats=1, loader_clips=2, table7_rows="rs50@160", table7_dtypes=("fp32",), table7_batch=2,
    table7_warmup=0, table7_repeats=1,
)

# Seconds each part may take at most; every part also leaves RESERVE_S for each part after it.
TIMEOUTS = {"device": 60, "install": 120, "jpegs": 60, "pretrain": 150, "model_only": 90, "model_only_compiled": 150,
            "dali": 150,
            "videos": 60, "video_train": 150, "video_model_only": 90, "video_loader": 90, "table7_bf16": 90,
            "table7_fp32": 90}
PARTS = tuple(TIMEOUTS)
NEEDS = {"pretrain": "jpegs", "dali": "jpegs", "video_train": "videos"}
RESERVE_S = 12
MIN_PART_S = 10


class Runner:
    """Runs subprocesses under one deadline: each gets min(its own timeout, what is left minus the reserve of the
    parts after it); its output goes to WORK/logs/PART.log."""

    def __init__(self, work: Path, site: Path, budget_s: float, started: float):
        self.work, self.site = work, site
        self.deadline = started + budget_s
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))

    def timeout(self, part: str, parts_after: int) -> float:
        left = self.deadline - time.time() - RESERVE_S * parts_after
        if left < MIN_PART_S:
            raise PartError("skipped: the check's time budget was spent by the parts before it")
        return min(TIMEOUTS[part], left)

    def run(self, part: str, command: list, timeout: float, cwd: Path | None = None) -> str:
        """stdout of `command` (a new process group, killed whole on timeout); PartError on failure or timeout."""
        log_path = self.logs / f"{part}.log"
        shown = " ".join(command) if "-c" not in command else f"{command[0]} -c ..."
        log(f"{part}: {shown} (timeout {timeout:.0f} s)")
        with open(log_path, "w") as stderr:
            process = subprocess.Popen(command, cwd=cwd or self.work, env=self.env, stdout=subprocess.PIPE,
                                       stderr=stderr, text=True, start_new_session=True)
            try:
                stdout, _ = process.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)  # the DataLoader workers too
                process.communicate()
                raise PartError(f"timed out after {timeout:.0f} s (log: {log_path})") from None
            except BaseException:  # Ctrl-C: its own session would not get the signal, so stop it here
                os.killpg(process.pid, signal.SIGKILL)
                raise
        if process.returncode != 0:
            raise PartError(f"exit code {process.returncode}: {last_lines(log_path.read_text(errors='replace'))} "
                            f"(log: {log_path})")
        return stdout

    def python(self, part: str, args: list, timeout: float) -> str:
        return self.run(part, [sys.executable, *args], timeout)

    def helper(self, part: str, args: list, timeout: float, last_json: bool = True) -> dict | None:
        """A subcommand of this file, run with the site on PYTHONPATH; its last stdout line is JSON (unless not
        `last_json`: None)."""
        stdout = self.python(part, [str(Path(__file__).resolve()), *args], timeout)
        return json.loads(stdout.strip().splitlines()[-1]) if last_json else None


def last_lines(text: str, count: int = 1) -> str:
    """The `error:` line of a CLI failure, else the last `count` non-empty lines."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return " | ".join(errors[-1:] or lines[-count:]) or "(no output)"


def throughput(metrics: Path, batch: int, warmup_steps: int) -> dict:
    """Images (or clips) per second over the train log windows after `warmup_steps`, from metrics.jsonl: each
    window's seconds are its images / its images_per_s (evaluation and checkpoint time are already left out)."""
    if not metrics.is_file():
        raise PartError(f"{metrics} was not written")
    events = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    windows, previous = [], 0
    for event in events:
        if event.get("kind") != "train":
            continue
        steps = event["step"] - previous
        if previous >= warmup_steps and event["images_per_s"] > 0:
            windows.append((steps * batch, steps * batch / event["images_per_s"], event["images_per_s"]))
        previous = event["step"]
    if not windows:
        raise PartError(f"{metrics}: no train log window after step {warmup_steps}")
    images = sum(w[0] for w in windows)
    seconds = sum(w[1] for w in windows)
    return {"per_s": round(images / seconds, 2), "timed_samples": images, "timed_seconds": round(seconds, 2),
            "windows_per_s": [w[2] for w in windows]}


def pretrain_command(s: Settings, root: str, out: Path, extra=()) -> list:
    """The arguments of `python -m rs_transfer`: one evaluation (of the val folder) and its checkpoint at the last
    step, the bookkeeping of one epoch end."""
    # a packaged config's name: the installed wheel's own copy is read, as a user's install would
    return ["pretrain", "--config", "pretrain/rs50_i160.yaml",
            f"data.root={root}", f"output_dir={out}", f"model.name={s.model}", "model.num_classes=null",
            "model.init=timm",  # the official init takes seconds longer and changes no timing
            f"data.image_size={s.image_size}", f"data.num_workers={s.pretrain_workers}", "train.epochs=null",
            f"train.steps={s.steps}", f"train.batch_size={s.batch}", f"train.log_every_steps={s.log_every}",
            f"train.amp={'bf16' if s.dtype == 'bf16' else 'none'}", "train.channels_last=true",
            f"train.device={s.device}", "train.eval_every_epochs=0", "train.eval_last_epochs=0", *extra]


def part_pretrain(runner: Runner, s: Settings, timeout: float, data: dict, name: str = "pretrain", extra=()) -> dict:
    out = runner.work / name
    command = pretrain_command(s, data["root"], out, extra)
    measures_path = runner.work / f"{name}_measures.json"
    runner.helper(name, ["measured-run", "--measures", str(measures_path), "--", *command], timeout, last_json=False)
    speed = throughput(out / "metrics.jsonl", s.batch, s.warmup_steps)
    measures = json.loads(measures_path.read_text())
    summary = json.loads((out / "summary.json").read_text())
    return {"images_per_s": speed["per_s"], "model": s.model, "image_size": s.image_size, "amp": s.dtype,
            "channels_last": True, "batch": s.batch, "num_workers": s.pretrain_workers,
            "loader_workers": measures["loader_workers"], "steps": s.steps,
            "warmup_steps_left_out": s.warmup_steps, "timed_images": speed["timed_samples"],
            "timed_seconds": speed["timed_seconds"], "windows_images_per_s": speed["windows_per_s"],
            "peak_mem_gib": measures["peak_mem_gib"], "peak_rss_gib": measures["peak_rss_gib"],
            "eval_images": data["val_images"], "eval_s": measures["evaluate_s"],
            "checkpoint_blocking_s": measures["checkpoint_blocking_s"],
            "checkpoint_write_s": measures["checkpoint_write_s"],
            "bookkeeping_s": round(summary["wall_s"] - summary["train_s"], 3),
            "command": "python -m rs_transfer " + " ".join(command)}


class Unavailable(PartError):
    """The part cannot run on this machine (not a failure): its figure is null, with the reason."""


def part_dali(runner: Runner, s: Settings, timeout: float, data: dict) -> dict:
    try:  # DALI (788 MB) is not in the wheel folder: only a machine that has it measures this part
        runner.python("dali", ["-c", "import nvidia.dali"], min(timeout, 60))
    except PartError as error:
        raise Unavailable(f"nvidia.dali is not importable here ({error})") from None
    return part_pretrain(runner, s, timeout, data, name="dali", extra=("data.backend=dali",))


def part_model_only(runner: Runner, s: Settings, timeout: float, compiled: bool = False) -> dict:
    """`bench latency` of the pretraining model, eager or (compiled) torch.compile'd with s.compile_backend: its
    first step, which compiles, is reported apart as compile_s."""
    command = ["-m", "rs_transfer", "bench", "latency", "--models", f"{s.model}@{s.image_size}", "--device",
               s.device, "--dtype", s.dtype, "--channels-last", "--batch", str(s.batch), "--warmup",
               str(s.latency_warmup), "--repeats", str(s.latency_repeats), "--json"]
    if compiled:
        command += ["--compile", s.compile_backend]
    name = "model_only_compiled" if compiled else "model_only"
    result = json.loads(runner.python(name, command, timeout))[0]
    keep = ("model", "resolution", "device", "dtype", "channels_last", "batch", "train_img_s", "train_s_per_128",
            "infer_batch", "infer_img_s", "peak_mem_gb", "torch_version", "compile_backend", "compile_s")
    return {**{key: result[key] for key in keep}, "command": "python " + " ".join(command)}


def part_video_train(runner: Runner, s: Settings, timeout: float, data: dict) -> dict:
    out = runner.work / "video_train"
    config = {
        "model": {"name": s.video_model, "temporal_kernels": "rs", "init": "timm"},
        "data": {"root": data["root"], "num_workers": s.workers, "clip_frames": s.clip_frames,
                 "frame_stride": s.frame_stride, "crop_size": s.crop, "eval_views": 1, "max_eval_videos": 2,
                 "eval_short_side": s.eval_size, "eval_crop_size": s.eval_size},
        "train": {"steps": s.video_steps, "batch_size": s.video_batch, "amp": "bf16" if s.dtype == "bf16" else "none",
                  "channels_last": True, "device": s.device, "eval_every_epochs": 0,
                  "log_every_steps": s.video_log_every},
        "output_dir": str(out),
    }
    config_path = runner.work / "video_train.yaml"
    config_path.write_text(json.dumps(config, indent=2) + "\n")  # JSON is YAML
    command = ["-m", "rs_transfer", "video", "train", "--config", str(config_path)]
    runner.python("video_train", command, timeout)
    speed = throughput(out / "metrics.jsonl", s.video_batch, s.video_warmup_steps)
    return {"clips_per_s": speed["per_s"], "model": s.video_model, "clip_frames": s.clip_frames,
            "frame_stride": s.frame_stride, "crop": s.crop, "amp": s.dtype, "channels_last": True,
            "batch": s.video_batch, "num_workers": s.workers, "steps": s.video_steps,
            "warmup_steps_left_out": s.video_warmup_steps, "timed_clips": speed["timed_samples"],
            "timed_seconds": speed["timed_seconds"], "windows_clips_per_s": speed["windows_per_s"],
            "config": config, "command": "python " + " ".join(command)}


def part_video_model_only(runner: Runner, s: Settings, timeout: float) -> dict:
    args = ["video-model", "--device", s.device, "--model", s.video_model, "--frames", str(s.clip_frames),
            "--crop", str(s.crop), "--batch", str(s.video_batch), "--dtype", s.dtype, "--channels-last",
            "--warmup", str(s.video_model_warmup), "--repeats", str(s.video_model_repeats)]
    return runner.helper("video_model_only", args, timeout)


def part_video_loader(runner: Runner, s: Settings, timeout: float) -> dict:
    command = ["-m", "rs_transfer", "bench", "video-data", "--workers", str(s.workers), "--clips",
               str(s.loader_clips)]
    result = json.loads(runner.python("video_loader", command, timeout))
    return {**result, "command": "python " + " ".join(command)}


def part_table7(runner: Runner, s: Settings, timeout: float, dtype: str) -> dict:
    """The Table 7 rows in `dtype`; rows finished before a failure or timeout are kept (table7.json is written
    after every row)."""
    out = runner.work / f"table7-{dtype}"
    command = ["-m", "rs_transfer", "bench", "table7", "--device", s.device, "--dtype", dtype, "--out", str(out),
               "--only", s.table7_rows, "--fresh"]
    for flag, value in (("--batch", s.table7_batch), ("--warmup", s.table7_warmup), ("--repeats", s.table7_repeats)):
        if value is not None:
            command += [flag, str(value)]
    error = None
    try:
        runner.python(f"table7_{dtype}", command, timeout)
    except PartError as failure:
        error = str(failure)
    rows = table7_rows(out / "table7.json")
    if not rows:
        raise PartError(error or f"{out / 'table7.json'} holds no measured row")
    entry = {"rows": rows, "pareto_png": (out / "pareto.png").is_file(), "command": "python " + " ".join(command)}
    return {**entry, "error": error} if error else entry


def table7_rows(path: Path) -> list:
    if not path.is_file():
        return []
    document = json.loads(path.read_text())
    results = {f"{r['model']}@{r['resolution']}": r for r in document["results"]}
    rows = []
    for row in document["rows"]:
        spec = f"{row['model']}@{row['resolution']}"
        if spec not in results:
            continue
        result = results[spec]
        rows.append({"spec": spec, "device": result["device"], "batch": result["batch"],
                     "s_per_128": result["train_s_per_128"], "v100_s_per_128_paper": row["v100_s_per_128_paper"],
                     "train_img_s": result["train_img_s"], "infer_img_s": result["infer_img_s"],
                     "peak_mem_gb": result["peak_mem_gb"], "speedup_measured": row["speedup_measured"],
                     "speedup_paper": row["speedup_paper"]})
    return rows


DEVICE_PROBE = """
import json, os, torch, torchvision, timm
cuda = torch.cuda.is_available()
print(json.dumps({"torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm.__version__,
                  "cuda_available": cuda, "gpu": torch.cuda.get_device_name(0) if cuda else None,
                  "gpu_count": torch.cuda.device_count(), "cuda": torch.version.cuda,
                  "cudnn": torch.backends.cudnn.version() if cuda else None, "cpu_count": os.cpu_count()}))
"""


def part_device(runner: Runner, s: Settings, timeout: float) -> dict:
    info = json.loads(runner.python("device", ["-c", DEVICE_PROBE], timeout))
    info["python"] = sys.version.split()[0]
    smi = shutil.which("nvidia-smi")
    if smi:
        query = subprocess.run([smi, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=30)
        info["nvidia_smi"] = query.stdout.strip()
    if s.device.startswith("cuda") and not info["cuda_available"]:
        raise PartError(f"--device {s.device}, but torch sees no CUDA device ({json.dumps(info)})")
    return info


def run_check(s: Settings, wheels: Path, site: Path, work: Path, budget_s: float, parts=PARTS) -> dict:
    """Every part in turn; returns the one JSON object the check prints."""
    started = time.time()
    if work.exists():
        shutil.rmtree(work)
    runner = Runner(work, site, budget_s, started)
    result = {"check": "rs-transfer one-call GPU check (docs/benchmarks.md)", "settings": asdict(s),
              "budget_s": budget_s}
    skipped = {f"table7_{dtype}" for dtype in ("bf16", "fp32") if dtype not in s.table7_dtypes}
    wanted = [p for p in PARTS if (p in parts or p in {NEEDS.get(q) for q in parts} or p in ("device", "install"))
              and p not in skipped]
    actions = {
        "device": lambda t: part_device(runner, s, t),
        "install": lambda t: install(wheels, site, t),
        "jpegs": lambda t: runner.helper("jpegs", ["make-jpegs", "--root", str(work / "jpegs"), "--classes",
                                                   str(s.classes), "--train-per-class", str(s.train_per_class),
                                                   "--val-per-class", str(s.val_per_class), "--processes",
                                                   str(max(1, s.workers))], t),
        "pretrain": lambda t: part_pretrain(runner, s, t, result["jpegs"]),
        "model_only": lambda t: part_model_only(runner, s, t),
        "model_only_compiled": lambda t: part_model_only(runner, s, t, compiled=True),
        "dali": lambda t: part_dali(runner, s, t, result["jpegs"]),
        "videos": lambda t: runner.helper("videos", ["make-videos", "--root", str(work / "videos"), "--classes", "2",
                                                     "--train-per-class", str(s.video_train_per_class),
                                                     "--val-per-class", "1", "--seconds", str(s.video_seconds)], t),
        "video_train": lambda t: part_video_train(runner, s, t, result["videos"]),
        "video_model_only": lambda t: part_video_model_only(runner, s, t),
        "video_loader": lambda t: part_video_loader(runner, s, t),
        "table7_bf16": lambda t: part_table7(runner, s, t, "bf16"),
        "table7_fp32": lambda t: part_table7(runner, s, t, "fp32"),
    }
    for index, part in enumerate(wanted):
        begun = time.time()
        try:
            needed = NEEDS.get(part)
            if needed and "error" in result.get(needed, {"error": ""}):
                raise PartError(f"no data: the {needed} part failed")
            if "error" in result.get("install", {}) and part != "device":
                raise PartError("not run: the install part failed")
            result[part] = actions[part](runner.timeout(part, len(wanted) - index - 1))
        except Unavailable as reason:
            result[part] = {"images_per_s": None, "reason": str(reason)}
        except PartError as error:
            result[part] = {"error": str(error)}
        except Exception as error:  # a bug in this file must not hide the other parts' figures
            result[part] = {"error": f"{type(error).__name__}: {error}"}
        result[part]["part_seconds"] = round(time.time() - begun, 1)
        entry = result[part]
        outcome = f"error: {entry['error']}" if "error" in entry else entry.get("reason", "done")
        log(f"{part}: {outcome} ({entry['part_seconds']} s)")
    result["e2e_over_model_only"] = ratio(result, "pretrain", "images_per_s", "model_only", "train_img_s")
    result["dali_e2e_over_model_only"] = ratio(result, "dali", "images_per_s", "model_only", "train_img_s")
    result["video_e2e_over_model_only"] = ratio(result, "video_train", "clips_per_s", "video_model_only",
                                                "clips_per_s")
    result["errors"] = sorted(p for p in wanted if "error" in result[p])
    result["goal"] = goal_figures(result)
    result["seconds"] = round(time.time() - started, 1)
    return result


# The figures that answer the 4-hour RS-50 goal (docs/benchmarks.md, "4-hour RS-50"), in the JSON's `goal` object;
# each is documented there (unit and meaning) and tests/test_gpu_check.py checks both against this list.
GOAL_KEYS = ("goal_img_s_per_gpu", "model_only_img_s", "model_only_compiled_img_s", "compile_backend", "compile_s",
             "e2e_img_s", "e2e_num_workers", "e2e_over_model_only", "e2e_over_model_only_compiled",
             "e2e_peak_mem_gib", "e2e_peak_rss_gib", "eval_s", "eval_images", "checkpoint_blocking_s",
             "checkpoint_write_s", "bookkeeping_s", "video_clips_s", "video_model_only_clips_s",
             "video_e2e_over_model_only", "dali_img_s", "dali_reason")
# 350 epochs x 1.28M images in under 4 hours on 8 GPUs: 448e6 / 14,400 s / 8
GOAL_IMG_S_PER_GPU = round(350 * 1.28e6 / (4 * 3600) / 8)


def goal_figures(result: dict) -> dict:
    """The GOAL_KEYS from the parts' entries; a key whose part failed or did not run is None (the part's entry
    holds the error)."""
    def get(part, key):
        value = result.get(part)
        return value.get(key) if isinstance(value, dict) else None

    def one(values):  # a list of per-event seconds: the single end-of-run cycle's (None when absent)
        return values[-1] if values else None

    figures = {
        "goal_img_s_per_gpu": GOAL_IMG_S_PER_GPU,
        "model_only_img_s": get("model_only", "train_img_s"),
        "model_only_compiled_img_s": get("model_only_compiled", "train_img_s"),
        "compile_backend": get("model_only_compiled", "compile_backend"),
        "compile_s": get("model_only_compiled", "compile_s"),
        "e2e_img_s": get("pretrain", "images_per_s"),
        "e2e_num_workers": get("pretrain", "loader_workers"),
        "e2e_over_model_only": result.get("e2e_over_model_only"),
        "e2e_over_model_only_compiled": ratio(result, "pretrain", "images_per_s", "model_only_compiled",
                                              "train_img_s"),
        "e2e_peak_mem_gib": get("pretrain", "peak_mem_gib"),
        "e2e_peak_rss_gib": get("pretrain", "peak_rss_gib"),
        "eval_s": one(get("pretrain", "eval_s")),
        "eval_images": get("pretrain", "eval_images"),
        "checkpoint_blocking_s": one(get("pretrain", "checkpoint_blocking_s")),
        "checkpoint_write_s": one(get("pretrain", "checkpoint_write_s")),
        "bookkeeping_s": get("pretrain", "bookkeeping_s"),
        "video_clips_s": get("video_train", "clips_per_s"),
        "video_model_only_clips_s": get("video_model_only", "clips_per_s"),
        "video_e2e_over_model_only": result.get("video_e2e_over_model_only"),
        "dali_img_s": get("dali", "images_per_s"),
        "dali_reason": get("dali", "reason") or get("dali", "error"),
    }
    return figures


def ratio(result: dict, part: str, key: str, reference: str, reference_key: str) -> float | None:
    """End-to-end speed over the model alone: near 1, the loader keeps up; well below 1, it is the bottleneck."""
    try:
        return round(result[part][key] / result[reference][reference_key], 4)
    except (KeyError, TypeError, ZeroDivisionError):
        return None


# --- command line ---------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    prep = commands.add_parser("prepare", help="build the wheel folder (here, where pip has an index)")
    prep.add_argument("--out", type=Path, default=DEFAULT_DIR / "wheels")
    prep.add_argument("--python-version", default=f"{sys.version_info.major}.{sys.version_info.minor}",
                      help="the device's Python (default: this one's)")
    prep.add_argument("--platform", action="append", help=f"wheel platform tags (default: {' '.join(PLATFORMS)})")
    prep.add_argument("--only", action="append", help="download only these distributions (tests)")

    run = commands.add_parser("run", help="install and measure (on the device; tools/gpu_check.sh calls this)")
    run.add_argument("--wheels", type=Path, default=DEFAULT_DIR / "wheels")
    run.add_argument("--site", type=Path, default=DEFAULT_DIR / "site")
    run.add_argument("--work", type=Path, default=DEFAULT_DIR / "run")
    run.add_argument("--budget-s", type=float, default=450, help="all parts together (default 450: under 8 min)")
    run.add_argument("--parts", help=f"comma-separated subset of {','.join(PARTS)}")
    run.add_argument("--tiny", action="store_true", help="tiny models and data (the CPU test of this script)")
    run.add_argument("--device", help="cuda (default) or cpu")
    run.add_argument("--batch", type=int, help="pretraining and bench latency batch (default 256)")
    run.add_argument("--steps", type=int, help="pretraining steps (default 160)")
    run.add_argument("--workers", type=int, help="the video runs' loader workers (default: CPUs - 2; the "
                     "pretraining runs take data.num_workers=auto)")
    run.add_argument("--pretrain-workers", help="the pretraining runs' data.num_workers (default auto; e.g. the "
                     "cores per GPU of an 8-GPU node)")
    run.add_argument("--table7-rows", help="Table 7 rows, NAME@RES,... (default rs50@160 and EfficientNet-B0/B1)")

    jpegs = commands.add_parser("make-jpegs", help="(internal) the JPEG folder")
    jpegs.add_argument("--root", type=Path, required=True)
    jpegs.add_argument("--classes", type=int, required=True)
    jpegs.add_argument("--train-per-class", type=int, required=True)
    jpegs.add_argument("--val-per-class", type=int, required=True)
    jpegs.add_argument("--processes", type=int, default=1)

    videos = commands.add_parser("make-videos", help="(internal) the video folder")
    videos.add_argument("--root", type=Path, required=True)
    videos.add_argument("--classes", type=int, required=True)
    videos.add_argument("--train-per-class", type=int, required=True)
    videos.add_argument("--val-per-class", type=int, required=True)
    videos.add_argument("--seconds", type=int, required=True)

    model = commands.add_parser("video-model", help="(internal) clips/s of the 3D model without a loader")
    model.add_argument("--device", required=True)
    model.add_argument("--model", required=True)
    model.add_argument("--frames", type=int, required=True)
    model.add_argument("--crop", type=int, required=True)
    model.add_argument("--batch", type=int, required=True)
    model.add_argument("--dtype", required=True)
    model.add_argument("--channels-last", action="store_true")
    model.add_argument("--warmup", type=int, required=True)
    model.add_argument("--repeats", type=int, required=True)

    measured = commands.add_parser("measured-run", help="(internal) python -m rs_transfer ARGS, with its "
                                   "evaluation and checkpoint seconds and peak memory written to --measures")
    measured.add_argument("--measures", type=Path, required=True)
    measured.add_argument("args", nargs=argparse.REMAINDER)

    args = parser.parse_args(argv)
    if args.command == "prepare":
        manifest = prepare(args.out, args.python_version, tuple(args.platform or PLATFORMS),
                           tuple(args.only) if args.only is not None else tuple(DEVICE_WHEELS))
        print(json.dumps(manifest, indent=2))
    elif args.command == "run":
        settings = TINY if args.tiny else Settings()
        changes = {"device": args.device, "batch": args.batch, "steps": args.steps, "workers": args.workers,
                   "pretrain_workers": args.pretrain_workers, "table7_rows": args.table7_rows}
        settings = replace(settings, **{k: v for k, v in changes.items() if v is not None})
        parts = tuple(args.parts.split(",")) if args.parts else PARTS
        unknown = sorted(set(parts) - set(PARTS))
        if unknown:
            parser.error(f"unknown parts {', '.join(unknown)}; parts: {', '.join(PARTS)}")
        print(json.dumps(run_check(settings, args.wheels.resolve(), args.site.resolve(), args.work.resolve(),
                                   args.budget_s, parts), indent=2))
    elif args.command == "make-jpegs":
        print(json.dumps(make_jpegs(args.root, args.classes, args.train_per_class, args.val_per_class,
                                    processes=args.processes)))
    elif args.command == "measured-run":
        return measured_run(args.args[1:] if args.args[:1] == ["--"] else args.args, args.measures)
    elif args.command == "make-videos":
        print(json.dumps(make_videos(args.root, args.classes, args.train_per_class, args.val_per_class,
                                     args.seconds)))
    else:
        print(json.dumps(video_model_only(args.device, args.model, args.frames, args.crop, args.batch, args.dtype,
                                          args.channels_last, args.warmup, args.repeats)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
