"""The CPU data path: `data.num_workers: auto` from the machine, and the reduced-scale JPEG decode."""

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from rs_transfer.config import ConfigError, RunConfig, find_config, load_config
from rs_transfer.pretrain import data as pretrain_data
from rs_transfer.pretrain import transforms
from rs_transfer.pretrain.config import PretrainConfig
from rs_transfer.engine import distributed
from rs_transfer.engine.distributed import loader_workers


@pytest.fixture
def machine(monkeypatch):
    """Set this process's cores and the launcher's variables: machine(cores, **environment)."""
    def set_up(cores: int, **environment):
        monkeypatch.setattr(distributed.os, "sched_getaffinity", lambda pid: set(range(cores)))
        for key in ("LOCAL_WORLD_SIZE", "SLURM_STEP_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE"):
            monkeypatch.delenv(key, raising=False)
        for key, value in environment.items():
            monkeypatch.setenv(key, value)
    return set_up


@pytest.mark.parametrize("cores, environment, expected", [
    (2, {}, 1),  # 2 cores: one core for the trainer, one worker
    (1, {}, 0),  # a single core: loading in the training process, the one case of 0
    (112, {"LOCAL_WORLD_SIZE": "8"}, 13),  # a DGX H100's physical cores under torchrun: 14 per GPU less 1
    (224, {"SLURM_STEP_TASKS_PER_NODE": "8(x2)"}, 27),  # srun, two nodes of 8 tasks: the first count is per node
    (64, {"SLURM_NTASKS_PER_NODE": "4"}, 15),
    (8, {"LOCAL_WORLD_SIZE": "8"}, 1),  # a core per process: still one worker, never 0 silently
    (256, {}, distributed.MAX_AUTO_WORKERS),
])
def test_auto_workers_follow_the_cores_and_processes_of_the_node(machine, cores, environment, expected):
    machine(cores, **environment)
    workers, why = loader_workers("auto")
    assert workers == expected
    assert why.startswith(f"auto: {cores} cores / ")
    assert ("one core" in why) == (expected == 0)
    assert loader_workers(3) == (3, "data.num_workers")  # a count is taken as it is


def test_num_workers_takes_auto_and_the_gpu_recipes_use_it():
    assert load_config(RunConfig, None, ["data.num_workers=auto"]).data.num_workers == "auto"
    assert load_config(RunConfig, None, ["data.num_workers=6"]).data.num_workers == 6
    with pytest.raises(ConfigError, match=r"data.num_workers='autp' makes no sense here: it must be 'auto' or a whole number$"):
        load_config(RunConfig, None, ["data.num_workers=autp"])
    for name in ("pretrain/recipe.yaml", "downstream/coco_det.yaml", "video/table6/01_baseline.yaml"):
        assert "num_workers: auto" in find_config(name).read_text()


def _encoded(size: tuple, kind: str = "JPEG") -> bytes:
    from rs_transfer.pretrain.synthetic import make_image

    buffer = io.BytesIO()
    options = {"quality": 90} if kind == "JPEG" else {}
    make_image(1, 4, size, np.random.default_rng(0)).save(buffer, format=kind, **options)
    return buffer.getvalue()


def test_fast_decode_draws_the_same_boxes_and_differs_only_where_it_decodes_reduced():
    size, jpeg = 64, _encoded((256, 192))
    crop = v2.RandomResizedCrop(size, ratio=transforms.RATIO)
    reductions = []
    for seed in range(24):
        # RandAugment at M=10 may paint a 64 px image one grey (a 100 px translation): pixels compared without it
        kind = "tf" if seed % 2 else "none"
        full = transforms.train_transform(size, kind, 2, 10.0)
        fast = transforms.train_transform(size, kind, 2, 10.0, fast_decode=True)
        torch.manual_seed(seed), random.seed(seed)
        reference, after_reference = full(pretrain_data.decode(jpeg)), (torch.rand(1), random.random())
        torch.manual_seed(seed), random.seed(seed)
        pixels, after = fast.augment(fast.decode(jpeg)), (torch.rand(1), random.random())
        assert after == after_reference  # the same draws: crop, flip and RandAugment, so the same boxes
        if kind == "tf":
            continue
        torch.manual_seed(seed)
        with Image.open(io.BytesIO(jpeg)) as header:
            box = crop.make_params([header])
            reductions.append(transforms.jpeg_reduction(header, min(box["width"], box["height"]), size))
        if reductions[-1] == 1:
            assert torch.equal(pixels, reference)  # too small a crop to reduce: the reference pixels exactly
        else:
            mse = ((pixels.double() - reference.double()) ** 2).mean()
            assert 0 < mse < 255 ** 2 / 10 ** 2.5  # reduced: different, yet above 25 dB PSNR (43 dB in the bench)
    assert 1 in reductions and max(reductions) > 1
    full, fast = (transforms.train_transform(size, "none", fast_decode=on) for on in (False, True))
    png = _encoded((256, 192), "PNG")  # PIL reduces JPEGs only: a PNG gets the reference pixels whatever the box
    torch.manual_seed(0)
    reference = full.transforms[0](pretrain_data.decode(png))
    torch.manual_seed(0)
    assert torch.equal(v2.functional.pil_to_tensor(fast.decode(png)), v2.functional.pil_to_tensor(reference))


def test_fast_decode_skips_unreadable_images_as_the_reference_does(tmp_path):
    good, bad = tmp_path / "good.jpg", tmp_path / "bad.jpg"
    good.write_bytes(_encoded((96, 64)))
    bad.write_bytes(_encoded((96, 64))[:200])  # a truncated JPEG: its header reads, its pixels do not
    items = [pretrain_data.Item("bad.jpg", 0, str(bad)), pretrain_data.Item("good.jpg", 1, str(good))]
    dataset = pretrain_data.ImageDataset(items, transforms.train_transform(32, "none", fast_decode=True))
    image, label = dataset[0]
    assert image.shape == (3, 32, 32) and label == 1 and dataset.skipped == 1


def test_fast_decode_is_refused_with_dali():
    with pytest.raises(ConfigError, match="data.fast_decode=true has no effect with data.backend=dali"):
        load_config(PretrainConfig, None, ["data.fast_decode=true", "data.backend=dali"])
