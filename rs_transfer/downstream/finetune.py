"""`rs-transfer finetune | sweep | demo`: one grid point, the grid, a synthetic demo (Table 5's runner, which
sweeps every checkpoint on every task, is rs_transfer/reproduce/table5.py).

A run is: look the task up in the registry (rs_transfer/downstream/registry.py), load its `<task>.yaml` (or
`--config`) into the task's own config schema, apply `key=value`, build the task (dataset, model, evaluator) and
hand it to the shared engine, which writes OUTPUT_DIR/final_metrics.json. Nothing here names a task.

Mistakes are answered cheapest first, before torch is imported (seconds, half a minute on a loaded machine): the
config (keys and values), the model name and weights file (`check_model`), the data.root layout (the task's
`check_data`); only then the trainer. This module, the registry and the task modules import no torch for that.
"""

import dataclasses
import logging
import os
import re
import tempfile
import time
from pathlib import Path

from rs_transfer.config import (
    ConfigError, load_config, packaged_configs, read_yaml, run_differences, string_override, to_dict,
)
from rs_transfer import families
from rs_transfer.downstream import protocol, registry
from rs_transfer.downstream.config import FinetuneConfig
from rs_transfer.engine.summary import FINAL_METRICS_FILE, read_final_metrics
from rs_transfer.errors import UserError
from rs_transfer.files import atomic_write_json

log = logging.getLogger(__name__)


def build_task(config):
    return registry.get(config.task.name).build(config)


def default_config(task: str, demo: bool = False) -> Path:
    folder = registry.get(task).config_dir or packaged_configs() / "downstream"
    return Path(folder) / f"{task}{'_demo' if demo else ''}.yaml"


def make_config(task: str, backbone=None, weights=None, config_path=None, overrides=()) -> FinetuneConfig:
    """The run config of `task`: its schema's defaults, the config file (`config_path`, default
    downstream/<task>.yaml), --backbone and --weights, then `overrides`.

    Raises ConfigError for a bad file, key or value, and when the file or an override sets task.name to another task
    than `task`: a config written for another task would otherwise run silently as this one."""
    fixed = []
    if backbone is not None:
        fixed.append(string_override("model.name", backbone))
    if weights is not None:
        fixed.append(string_override("model.weights", weights))
    path = config_path or default_config(task)
    try:
        config = load_config(registry.get(task).config, path, fixed + list(overrides))
    except ConfigError as error:
        raise ConfigError(f"{error}{_owners(str(error), task)}") from None
    if config.task.name not in ("", task):  # "": a file that leaves the name to --task
        if any(item.strip().startswith("task.name=") for item in overrides):
            raise ConfigError(f"override task.name={config.task.name} contradicts --task {task}")
        raise ConfigError(f"config file {path} has task.name: {config.task.name}, which contradicts --task {task}: "
                          f"give a config of {task}, or --task {config.task.name}")
    config.task.name = task
    return config


def _owners(message: str, task: str) -> str:
    """For an unknown task key: which tasks have it (the usual cause: a key or a `base:` of another task)."""
    found = re.search(r"unknown key 'task\.(\w+)'", message)
    if not found:
        return ""
    owners = [name for name in registry.names()
              if found.group(1) in {f.name for f in dataclasses.fields(registry.get(name).config().task)}]
    return f" (task.{found.group(1)} is a key of {', '.join(owners)}, not of {task})" if owners else ""


def write_synthetic(task: str, root, images: int, shown_as=None) -> Path:
    """Task `task`'s tiny dataset of `images` training images (and a quarter as many for validation) in `root`;
    the log names `shown_as` (where it will be: `write_once` writes into a staging folder first) or `root`."""
    val = max(images // 4, 2)
    log.info("writing a synthetic %s dataset (%d train, %d val images) to %s", task, images, val, shown_as or root)
    return registry.get(task).write_synthetic(root, images, val)


def check_model(config: FinetuneConfig) -> None:
    """Check model.name and model.weights before anything is written or trained, so that a typo fails in a second,
    not after the synthetic dataset is written. Raises UserError for a name no model family owns (models/registry.py), WeightsError
    for a `timm:` name not in the cache (models/hub.resolve), a missing file, or a file that is neither a PyTorch
    checkpoint nor safetensors (a text file would otherwise fail inside torch.load as "KeyError: 101")."""
    from rs_transfer.models import check_weights, family_of

    family_of(config.model.name)
    check_weights(config.model.weights)


def check_data(config: FinetuneConfig) -> None:
    """The task's data.root layout check (TransferTaskDeclaration.check_data), when the task has one: torch-free and
    cheap. Raises ConfigError for an unset data.root, DataError naming a missing folder or file."""
    check = registry.get(config.task.name).check_data
    if check is not None:
        check(config)


def run(config: FinetuneConfig, synthetic: bool = False) -> dict:
    """Train `config` (checked by make_config) and return its final metrics. The model and weights, then the data
    layout, are checked before the trainer (and torch) is imported. Under torchrun every rank checks: each fails
    the same way, and no rank waits for one that stopped."""
    check_model(config)
    if synthetic:
        from rs_transfer.engine.write_once import write_once  # imports torch (its rank helpers): data is written

        root = Path(config.data.root or Path(config.output_dir) / "synthetic_data")
        # A folder the user filled keeps its data (the loader checks its layout).
        write_once(root, lambda folder: write_synthetic(config.task.name, folder, config.data.synthetic_images, root))
        config.data.root = str(root)
    check_data(config)
    if os.environ.get("RANK", "0") == "0":  # torch's import and the model's build took minutes on a busy CPU, silent
        log.info("%s: config, model name, weights and data.root checked; importing torch, building %s and the data "
                 "(the start block follows)", config.task.name, config.model.name)
    from rs_transfer.engine.distributed import seed_everything
    from rs_transfer.engine.trainer import train

    import torch

    too_big = gpu_sized(config, torch.cuda.is_available())
    if too_big and os.environ.get("RANK", "0") == "0":
        log.warning("%s", too_big)
    seed_everything(config.seed)  # before the model and anything else random is built: same seed, same run
    task = families.build(registry.get(config.task.name), config)
    return train(config, task)  # the engine logs the run summary (metric, best, outputs): not repeated here


# Pixels per training step above which a CPU step is GPU-sized: the paper's 64 crops of 512 px (16.8M) took rs152 past
# 18 GB and was killed by the kernel on a 24 GB machine before its first step ended; the demos take 16 x 64 x 64.
GPU_SIZED_PIXELS = 16 * 256 * 256


def gpu_sized(config: FinetuneConfig, cuda: bool) -> str | None:
    """The warning for a GPU-sized step (train.batch_size x the task's crop or image size squared) about to run on a
    CPU, naming the task's demo config; None on a GPU or for a CPU-sized step. Said before the first step: the
    engine's estimate of the run's length comes only after it, which here can take many minutes or never end."""
    side = getattr(config.task, "crop_size", None) or getattr(config.task, "image_size", None)
    on_cpu = config.train.device == "cpu" or (config.train.device == "auto" and not cuda)
    if not on_cpu or side is None or config.train.batch_size * side * side <= GPU_SIZED_PIXELS:
        return None
    demo = default_config(config.task.name, demo=True)
    if demo.is_relative_to(packaged_configs()):
        demo = demo.relative_to(packaged_configs())
    return (f"a GPU-sized step on a CPU: train.batch_size={config.train.batch_size} images of {side} px "
            f"({config.train.steps} steps); its first step alone may take many minutes and tens of GB. For a try on "
            f"this machine: --config {demo.as_posix()} (or smaller train.batch_size and task.crop_size/image_size)")


def finetune(task, backbone=None, weights=None, config_path=None, overrides=(), synthetic=False) -> dict:
    return run(make_config(task, backbone, weights, config_path, overrides), synthetic=synthetic)


def sweep(task, backbone=None, weights=None, config_path=None, overrides=(), point=None, synthetic=False,
          learning_rates=None, steps=None) -> dict:
    """Run the task's grid (or one point of it, by index, for one job per point) into OUTPUT_DIR/<point>/, then
    collect every finished point and write OUTPUT_DIR/sweep.json with the best."""
    grid_keys = [item for item in overrides if item.partition("=")[0].strip() in GRID_KEYS]
    if grid_keys:  # each grid point sets them: an override would be replaced without a word
        raise UserError(f"sweep sets train.lr and train.steps per grid point, so {', '.join(grid_keys)} would be "
                        "ignored: choose the grid with --learning-rates and --steps (e.g. --steps 200 for a quick "
                        "try), or run one point with finetune")
    base = make_config(task, backbone, weights, config_path, overrides)
    points = protocol.grid(task, learning_rates, steps)
    chosen = points if point is None else [points[_check_point(point, len(points))]]
    for lr, s in chosen:
        out = Path(base.output_dir) / protocol.point_name(lr, s)
        config = make_config(task, backbone, weights, config_path,
                             list(overrides) + [f"train.lr={lr}", f"train.steps={s}", string_override("output_dir", out)])
        if (out / FINAL_METRICS_FILE).is_file():
            check_finished_point(out, config)
            log.info("%s: finished earlier with this config, skipped", out)
            continue
        run(config, synthetic=synthetic)
    return collect_sweep(base.output_dir, task, registry.get(task).metric_of(base.task))


GRID_KEYS = ("train.lr", "train.steps", "train.epochs")


def check_finished_point(folder: Path, config: FinetuneConfig) -> None:
    """A finished grid point is reused only if it ran this config (another backbone, weights or setting in the same
    output_dir would silently stand in for this one). Raises UserError naming the differences."""
    saved_path = folder / "config.yaml"
    try:
        saved = read_yaml(saved_path.read_text(encoding="utf-8"), str(saved_path))
    except (OSError, UnicodeDecodeError, ConfigError) as error:
        raise UserError(f"{folder} holds a finished grid point whose {saved_path.name} cannot be read ({error}): "
                        "remove the folder to run the point again") from None
    changed = run_differences(saved, to_dict(config), where="there", defaults=to_dict(type(config)()))
    if changed:
        raise UserError(f"{folder} holds a finished grid point of another config ({'; '.join(changed[:6])}): use "
                        "another output_dir, or remove the folder to run the point again")


def _check_point(point: int, count: int) -> int:
    if not 0 <= point < count:
        raise UserError(f"--point {point} is outside the grid of {count} points (0..{count - 1})")
    return point


def collect_sweep(folder, task, metric: str | None = None) -> dict:
    """Write FOLDER/sweep.json from every finished grid point (FOLDER/lr*_steps*/final_metrics.json) and return it:
    {"task", "metric", "best": the point with the highest metric, "points"}; `metric` None: the task's default (the
    sweep's config names another, e.g. "miou_slide": TransferTaskDeclaration.metric_of). Raises UserError when no
    point has finished, DataError naming the file when one's final_metrics.json is unreadable or lacks the metric."""
    metric = metric or registry.get(task).metric
    results = []
    for path in sorted(Path(folder).glob(f"lr*_steps*/{FINAL_METRICS_FILE}")):
        values = read_final_metrics(path.parent, metric)
        results.append({"point": path.parent.name, metric: values[metric]})
    if not results:
        raise UserError(f"no finished grid points (lr*_steps*/final_metrics.json) in {folder}")
    best = max(results, key=lambda r: r[metric])
    summary = {"task": task, "metric": metric, "best": best, "points": results}
    atomic_write_json(Path(folder) / "sweep.json", summary)
    return summary


def demo(task: str = "pascal_seg", data_dir=None, output_dir=None, overrides=()) -> dict:
    """Write a small synthetic dataset in the task's real format and fine-tune the demo config on it."""
    start = time.perf_counter()
    work = None if data_dir and output_dir else Path(tempfile.mkdtemp(prefix=f"rs-transfer-demo-{task}-"))
    data_dir = Path(data_dir or work / "data")
    output_dir = Path(output_dir or work / "run")
    config = load_config(registry.get(task).config, default_config(task, demo=True),
                         [f"task.name={task}", string_override("data.root", data_dir),
                          string_override("output_dir", output_dir), *overrides])
    metrics = run(config, synthetic=True)
    name = registry.get(task).metric_of(config.task)
    print(f"{task}: {name} = {metrics[name]:.3f} on the synthetic validation set after {config.train.steps} steps "
          f"({time.perf_counter() - start:.0f} s); data in {data_dir}, run in {output_dir}")
    return metrics

