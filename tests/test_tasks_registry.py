"""A transfer task is one module (rs_transfer/downstream/registry.py): the example of docs/downstream.md "Adding a
task", read from the page, written to a temp folder with its own config section and YAML and registered with one
line, runs `finetune`, `sweep` and Table 5 through the CLI without any other file of the package edited; installed
as a plugin (an `rs_transfer.tasks` entry point) it runs through `python -m rs_transfer`. And a task's config
refuses another task's keys by name."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from rs_transfer.cli import main
from rs_transfer.config import ConfigError
from rs_transfer.downstream import finetune, protocol, registry

REPO = Path(__file__).resolve().parents[1]


def doc_example(name: str) -> str:
    """The file `name` as docs/downstream.md shows it (the code block after its `example file:` marker)."""
    text = (REPO / "docs" / "downstream.md").read_text(encoding="utf-8")
    found = re.search(rf"<!-- example file: {re.escape(name)} .*?-->\n```\w+\n(.*?)\n```\n", text, re.S)
    assert found, f"docs/downstream.md shows no {name}"
    return found.group(1) + "\n"


TOY_MODULE = doc_example("toy_task.py")
TOY_YAML = doc_example("toy_task.yaml")


def write_toy_task(folder: Path) -> Path:
    folder.mkdir(exist_ok=True)
    (folder / "toy_task.py").write_text(TOY_MODULE)
    (folder / "toy_task.yaml").write_text(TOY_YAML)
    return folder


def install_plugin(folder: Path, entry_points: str) -> None:
    """What `pip install` leaves on the path for a package whose pyproject.toml declares
    `[project.entry-points."rs_transfer.tasks"]` with these lines."""
    info = folder / "mytask-0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mytask\nVersion: 0\n")
    (info / "entry_points.txt").write_text(f"[rs_transfer.tasks]\n{entry_points}\n")


@pytest.fixture
def toy_task(tmp_path, monkeypatch):
    write_toy_task(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "MODULES", dict(registry.MODULES))  # the registry as it was, after the test
    registry.register("toy_task", "toy_task")  # the one line that adds a task
    yield tmp_path
    sys.modules.pop("toy_task", None)


def test_a_sixth_task_runs_finetune_sweep_and_table5_through_the_cli(toy_task, tmp_path, capsys):
    data, run, sweep_dir, table = (tmp_path / name for name in ("data", "run", "sweep", "table"))
    assert main(["finetune", "--task", "toy_task", "--synthetic", f"data.root={data}", f"output_dir={run}",
                 "train.device=cpu"]) == 0
    metrics = json.loads((run / "final_metrics.json").read_text())
    assert 0.5 <= metrics["acc"] <= 1.0  # chance is 0.25
    assert "noise: 0.2" in (run / "config.yaml").read_text()  # the task's own key, from its YAML
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (16, 16), (0, 0, 255)).save(images / "blue.png")
    assert main(["predict", "--run", str(run), "--images", str(images), "--out", str(tmp_path / "out")]) == 0
    top5 = json.loads((tmp_path / "out" / "predictions.json").read_text())["predictions"][0]["top5"]
    assert sorted(c["class"] for c in top5) == ["blue", "green", "red", "yellow"]

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


def test_the_example_task_imports_no_torch(tmp_path):
    # The rule for every task module (docs/layout.md): its TASK, config schema and layout check come without torch.
    folder = write_toy_task(tmp_path / "site")
    code = "import sys, toy_task; toy_task.TASK.check_data; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), str(REPO)])})
    assert result.stdout.strip() == "False"


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


def test_an_installed_plugin_task_runs_through_python_m_rs_transfer(tmp_path):
    # A package declaring the entry point, as pip installs it: nothing registers the task in the process.
    plugin = write_toy_task(tmp_path / "site")
    install_plugin(plugin, "toy_task = toy_task")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin), str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "rs_transfer", "finetune", "--task", "toy_task", "--synthetic",
         f"data.root={tmp_path / 'data'}", f"output_dir={tmp_path / 'run'}", "train.device=cpu"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "final_metrics.json").read_text())
    assert 0.5 <= metrics["acc"] <= 1.0  # chance is 0.25


@pytest.fixture
def installed_plugins(tmp_path, monkeypatch):
    """Install entry points in a temp folder on sys.path for this test; the registry reads them afresh."""
    def install(entry_points: str) -> Path:
        write_toy_task(tmp_path)
        install_plugin(tmp_path, entry_points)
        monkeypatch.syspath_prepend(str(tmp_path))
        registry.plugins.cache_clear()  # read once per process: this test installs after the first read
        return tmp_path

    yield install
    registry.plugins.cache_clear()
    sys.modules.pop("toy_task", None)


def test_plugin_names_follow_the_packages_and_do_not_replace_them(installed_plugins, caplog):
    installed_plugins("toy_task = toy_task\ncifar100 = toy_task")
    assert registry.names() == (*registry.MODULES, "toy_task")
    assert registry.get("toy_task").protocol.column == "toy acc"
    assert registry.get("cifar100").protocol.metric == "top1"  # the package's, not the plugin's
    assert "ignored the rs_transfer.tasks entry point cifar100 = toy_task" in caplog.text


@pytest.mark.parametrize("entry_point, message", [
    ("broken = no_such_module_here", "the rs_transfer.tasks entry point broken = 'no_such_module_here' cannot be "
                                     "imported: ModuleNotFoundError: No module named 'no_such_module_here'"),
    ("broken = toy_task", "the rs_transfer.tasks entry point broken = 'toy_task' declares task 'toy_task', "
                          "registered as 'broken'"),
    ("broken = json", "the rs_transfer.tasks entry point broken = 'json' declares no TASK = "
                      "TransferTaskDeclaration(...)"),
    ("broken = toy_task:TASK", "the rs_transfer.tasks entry point broken = 'toy_task:TASK': the value must be a "
                               "module path"),
])
def test_a_broken_plugin_is_one_error_line_naming_its_entry_point(installed_plugins, entry_point, message, capsys):
    folder = installed_plugins(entry_point)
    assert main(["finetune", "--task", "broken", "--synthetic", f"output_dir={folder / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, err
