"""A transfer task is one module (rs_transfer/downstream/registry.py): a sixth task written here, in a temp folder,
with its own config section and YAML, registered with one line, runs `finetune`, `sweep` and Table 5 through the
CLI without any other file of the package edited. And a task's config refuses another task's keys by name."""

import json
import sys
import textwrap

import pytest

from rs_transfer.cli import main
from rs_transfer.config import ConfigError
from rs_transfer.downstream import finetune, protocol, registry

TOY_MODULE = '''
"""toy_task: 4 colours, 4 classes, 16 px images in one .npz file; a tiny conv net; accuracy."""

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from rs_transfer.config import at_least, checked
from rs_transfer.downstream.config import FinetuneConfig, TaskSection
from rs_transfer.downstream.protocol import Protocol
from rs_transfer.downstream.registry import TransferTask
from rs_transfer.engine.task import Task

COLOURS = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]], dtype=np.float32)
PROTOCOL = Protocol("acc", (4, 8), 8, None, "toy acc")


@dataclass
class ToySection(TaskSection):
    name: str = "toy_task"
    noise: float = checked(0.3, at_least(0))  # the one key only this task has


@dataclass
class ToyConfig(FinetuneConfig):
    task: ToySection = field(default_factory=ToySection)


def write_synthetic(root, train, val):
    rng = np.random.default_rng(0)
    root = Path(root)
    root.mkdir(parents=True)
    for split, count in (("train", train), ("val", val)):
        labels = np.arange(count) % 4
        np.save(root / f"{split}_labels.npy", labels)
        np.save(root / f"{split}_colours.npy", COLOURS[labels])
    return root


class ToySet(Dataset):
    def __init__(self, root, split, noise):
        self.labels = np.load(Path(root) / f"{split}_labels.npy")
        self.colours = np.load(Path(root) / f"{split}_colours.npy")
        self.noise = noise

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        image = torch.from_numpy(self.colours[i])[:, None, None] + self.noise * torch.randn(3, 16, 16)
        return {"image": image, "label": torch.tensor(int(self.labels[i]))}


class ToyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, batch):
        logits = self.fc(F.relu(self.conv(batch["image"])).mean((2, 3)))
        return {"loss": F.cross_entropy(logits, batch["label"])} if self.training else logits


def build(config):
    val_set = ToySet(config.data.root, "val", config.task.noise)

    def evaluate(model):
        with torch.no_grad():
            batch = {k: torch.stack([val_set[i][k] for i in range(len(val_set))]) for k in ("image", "label")}
            return {"acc": (model(batch).argmax(1) == batch["label"]).float().mean().item()}

    return Task(model=ToyNet(), train_set=ToySet(config.data.root, "train", config.task.noise), evaluate=evaluate,
                primary_metric=PROTOCOL.metric)


TASK = TransferTask(name="toy_task", config=ToyConfig, build=build, protocol=PROTOCOL, write_synthetic=write_synthetic,
                    paper={("R152", "RS", 400): 99.0}, config_dir=Path(__file__).parent)
'''

TOY_YAML = """
task:
  name: toy_task
  noise: 0.2
data:
  num_workers: 0
  synthetic_images: 32
train:
  steps: 8
  batch_size: 8
  lr: 0.5
  scale_lr: false
  weight_decay: 0.0
  channels_last: false
  eval_every_epochs: 0
  log_every_steps: 4
output_dir: runs/toy
"""


@pytest.fixture
def toy_task(tmp_path, monkeypatch):
    (tmp_path / "toy_module.py").write_text(textwrap.dedent(TOY_MODULE))
    (tmp_path / "toy_task.yaml").write_text(TOY_YAML)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "MODULES", dict(registry.MODULES))  # the registry as it was, after the test
    registry.register("toy_task", "toy_module")  # the one line that adds a task
    yield tmp_path
    sys.modules.pop("toy_module", None)


def test_a_sixth_task_runs_finetune_sweep_and_table5_through_the_cli(toy_task, tmp_path, capsys):
    data, run, sweep_dir, table = (tmp_path / name for name in ("data", "run", "sweep", "table"))
    assert main(["finetune", "--task", "toy_task", "--synthetic", f"data.root={data}", f"output_dir={run}",
                 "train.device=cpu"]) == 0
    metrics = json.loads((run / "final_metrics.json").read_text())
    assert 0.5 <= metrics["acc"] <= 1.0  # chance is 0.25
    assert "noise: 0.2" in (run / "config.yaml").read_text()  # the task's own key, from its YAML

    assert protocol.grid("toy_task", learning_rates=[0.01, 0.5]) == [(0.01, 4), (0.5, 4), (0.01, 8), (0.5, 8)]
    assert main(["sweep", "--task", "toy_task", "--synthetic", f"data.root={data}", f"output_dir={sweep_dir}",
                 "train.device=cpu", "--point", "5"]) == 0
    assert main(["sweep", "--task", "toy_task", "--synthetic", f"data.root={data}", f"output_dir={sweep_dir}",
                 "train.device=cpu", "--point", "12"]) == 0
    summary = json.loads((sweep_dir / "sweep.json").read_text())
    assert summary["metric"] == "acc" and [p["point"] for p in summary["points"]] == ["lr0.16_steps4", "lr0.16_steps8"]
    assert summary["best"]["point"] in ("lr0.16_steps4", "lr0.16_steps8")
    assert summary["best"]["acc"] == max(p["acc"] for p in summary["points"]) and 0 <= summary["best"]["acc"] <= 1

    capsys.readouterr()
    # a toy run given as cifar100 is refused: it has no top1
    assert main(["reproduce", "table5", "--result", f"toy:cifar100={run}", "--out", str(table)]) == 2
    assert "has no 'top1'" in capsys.readouterr().err
    assert main(["reproduce", "table5", "--result", f"toy:toy_task={sweep_dir}", "--out", str(table)]) == 0
    result = json.loads((table / "table5.json").read_text())
    assert result["ours"][0]["toy_task"] == pytest.approx(100 * summary["best"]["acc"])
    assert result["ours"][0]["cifar100"] is None
    paper = {row["label"]: row for row in result["paper"]}
    assert paper["paper R152 RS (400 ep)"]["toy_task"] == 99.0 and paper["paper R152 RS (400 ep)"]["pascal_seg"] == 78.2
    assert paper["paper R152 supervised (90 ep)"]["toy_task"] is None
    markdown = (table / "table5.md").read_text()
    assert "| toy acc |" in markdown and "| paper R152 RS (400 ep) | 88.1 | 82.2 | 78.2 | 42.2 | 83.4 | 99.0 |" in markdown


def test_the_cli_offers_registered_tasks_only(toy_task, capsys):
    registry.MODULES.pop("toy_task")
    with pytest.raises(SystemExit):
        main(["finetune", "--task", "toy_task"])
    assert "invalid choice: 'toy_task'" in capsys.readouterr().err


@pytest.mark.parametrize("task,override", [
    ("cifar100", "task.crop_size=64"),  # pascal_seg's, nyu_depth's, pascal_det's key
    ("nyu_depth", "task.det_eval_size=128"),  # pascal_det's
    ("pascal_det", "task.head_channels=32"),  # the dense heads' (segmentation, depth)
    ("ade_seg", "task.sbd_root=/data/sbd"),  # pascal_seg's
    ("pascal_seg", "task.nyu_format=h5"),  # nyu_depth's
])
def test_a_key_of_another_task_is_refused_by_name(task, override):
    with pytest.raises(ConfigError, match=f"unknown key '{override.split('=')[0]}'") as error:
        finetune.make_config(task, overrides=[override])
    assert str(error.value).endswith(f"not of {task})")  # names the tasks that have the key


def test_a_config_file_with_another_tasks_key_is_refused_by_name(toy_task, tmp_path):
    (tmp_path / "bad.yaml").write_text("task:\n  name: toy_task\n  crop_size: 64\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'task.crop_size'"):
        finetune.make_config("toy_task", config_path=tmp_path / "bad.yaml")
    assert finetune.make_config("toy_task", overrides=["task.noise=0.5"]).task.noise == 0.5


def test_a_point_saved_with_every_tasks_keys_still_matches(tmp_path):
    # Before each task had its own section, every config.yaml held every task's keys (unused by the others).
    import yaml

    from rs_transfer.config import to_dict

    config = finetune.make_config("pascal_seg", overrides=[f"output_dir={tmp_path}"])
    saved = to_dict(config)
    saved["task"].update(det_eval_size=896, nyu_format="auto", image_size=256)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    finetune.check_finished_point(tmp_path, config)
    saved["task"]["crop_size"] = 256  # a key of this task still counts
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(finetune.UserError, match="task.crop_size: 256 there, 512 now"):
        finetune.check_finished_point(tmp_path, config)
