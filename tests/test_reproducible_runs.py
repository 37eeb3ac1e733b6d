"""Same config + same seed = the same run, for every entry point that trains or labels.

Two runs in one process are the strict case: the first run moves every global random generator, so the second
only matches when each entry point seeds before it builds the model (or anything else random). A run killed with
SIGKILL and resumed must end bitwise where an uninterrupted run ends, with nothing but the config in common.
"""

import json
from pathlib import Path

import pytest
import torch

from engine_toy import CONFIGS, killed_and_resumed_ends_where_it_would_have, same_weights

PRETRAIN = ["model.name=rs26-w0.25", "data.image_size=32", "train.epochs=2", "train.batch_size=32",
            "data.num_workers=0", "train.log_every_steps=4"]


def same_metrics(a: Path, b: Path) -> None:
    assert json.loads((a / "final_metrics.json").read_text()) == json.loads((b / "final_metrics.json").read_text())


@pytest.fixture(scope="module")
def folder_dataset(tmp_path_factory) -> Path:
    from rs_transfer.pretrain.synthetic import make_folder_dataset

    return make_folder_dataset(tmp_path_factory.mktemp("images"), num_classes=4, train_per_class=16, val_per_class=4)


@pytest.mark.slow
def test_pretrain_twice_in_one_process_gives_the_same_weights(tmp_path, folder_dataset):
    from rs_transfer.pretrain.run import pretrain

    for name in ("a", "b"):
        pretrain(str(CONFIGS / "pretrain/demo.yaml"),
                 [*PRETRAIN, f"data.root={folder_dataset}", f"output_dir={tmp_path / name}"])
    same_weights(tmp_path / "a" / "final.pt", tmp_path / "b" / "final.pt")
    same_metrics(tmp_path / "a", tmp_path / "b")


@pytest.mark.slow
def test_finetune_twice_in_one_process_gives_the_same_weights(tmp_path):
    from rs_transfer.downstream.finetune import finetune, write_synthetic

    root = write_synthetic("cifar100", tmp_path / "cifar", 64)
    for name in ("a", "b"):
        finetune("cifar100", config_path=CONFIGS / "downstream/cifar100_demo.yaml",
                 overrides=[f"data.root={root}", "train.steps=6", f"output_dir={tmp_path / name}"])
    same_weights(tmp_path / "a" / "final.pt", tmp_path / "b" / "final.pt")
    same_metrics(tmp_path / "a", tmp_path / "b")


@pytest.mark.slow
def test_video_train_twice_in_one_process_gives_the_same_weights(tmp_path):
    from rs_transfer.video.run import run_train

    for name in ("a", "b"):
        run_train(str(CONFIGS / "video/demo.yaml"),
                  [f"data.root={tmp_path / 'videos'}", "train.epochs=1", f"output_dir={tmp_path / name}"])
    same_weights(tmp_path / "a" / "final.pt", tmp_path / "b" / "final.pt")
    same_metrics(tmp_path / "a", tmp_path / "b")


@pytest.mark.slow
def test_pseudo_label_twice_gives_the_same_labels(tmp_path, folder_dataset):
    from rs_transfer.models import create_model
    from rs_transfer.pretrain.pseudo_label import label_images

    torch.save(create_model("rs26-w0.25", num_classes=4).state_dict(), tmp_path / "teacher.pth")
    for name in ("a", "b"):
        label_images(str(tmp_path / "teacher.pth"), str(folder_dataset / "val"), str(tmp_path / name),
                     model_name="rs26-w0.25", image_size=32, batch_size=8, topk=2, threshold=0.0, num_workers=0)
    for name in ("labels/label.npy", "labels/confidence.npy", "labels/topk_class.npy", "labels/topk_prob.npy",
                 "selected.npy"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


@pytest.mark.slow  # three CLI processes (forked from this one: forked_ranks.py)
def test_pretrain_killed_and_resumed_ends_bitwise_where_an_uninterrupted_run_ends(tmp_path, folder_dataset):
    # Two loader workers with RandAugment, checkpoints every 2 steps: the kill lands wherever it lands.
    args = ["pretrain", "--config", str(CONFIGS / "pretrain/demo.yaml"), *PRETRAIN, "data.num_workers=2",
            "train.epochs=4", "train.checkpoint_every_steps=2", f"data.root={folder_dataset}"]
    killed_and_resumed_ends_where_it_would_have(args, tmp_path, {}, ranks=1)
