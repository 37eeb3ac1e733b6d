"""A non-editable install works from any folder: the YAML configs ship as package data and are found by name.

The package is installed without its dependencies into a temp folder put first on PYTHONPATH, as `pip install .`
would install it. This venv also has an editable install of the checkout, so every run prints which
`rs_transfer` it imported and the test checks it is the installed copy.
"""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rs_transfer.config import ConfigError, find_config, load_config, packaged_configs
from rs_transfer.pretrain.config import PretrainConfig

REPO = Path(__file__).resolve().parents[1]
# `python -m rs_transfer ARGS` (runpy runs the package's __main__ the same way), after printing where it came from
RUN_AS_MODULE = ("import runpy, rs_transfer; print('rs_transfer imported from', rs_transfer.__file__, flush=True); "
                 "runpy.run_module('rs_transfer', run_name='__main__')")
TINY = ["train.warmup_steps=0", "train.batch_size=2", "train.log_every_steps=1"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """`pip install --target SITE .` from a clean copy of the tree (a build leaves build/ where it runs)."""
    work = tmp_path_factory.mktemp("install")
    source = work / "src"
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(REPO / name, source / name)
    shutil.copytree(REPO / "rs_transfer", source / "rs_transfer", ignore=shutil.ignore_patterns("__pycache__"))
    site = work / "site"
    # offline with this venv's setuptools; a venv without one (Python >= 3.12) lets pip fetch it to build
    isolation = ["--no-build-isolation", "--no-index"] if importlib.util.find_spec("setuptools") else []
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", *isolation, "--no-compile",
                           "--target", str(site), str(source)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return site


def run_installed(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """`python -m rs_transfer ARGS` from `cwd` with only the installed copy on PYTHONPATH; checks which copy ran."""
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", RUN_AS_MODULE, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    imported = Path(done.stdout.splitlines()[0].removeprefix("rs_transfer imported from "))
    assert imported == site / "rs_transfer" / "__init__.py", done.stdout.splitlines()[0]
    return done


def test_an_install_holds_every_config(installed):
    shipped = sorted(p.relative_to(installed / "rs_transfer" / "configs") for p in installed.rglob("*.yaml"))
    in_tree = sorted(p.relative_to(packaged_configs()) for p in packaged_configs().rglob("*.yaml"))
    assert shipped == in_tree and len(in_tree) > 50


@pytest.mark.slow
def test_demo_and_pretrain_find_their_configs_from_another_folder(installed, tmp_path):
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    demo = run_installed(installed, cwd, "demo", "--output", str(tmp_path / "demo"), "train.steps=2",
                         "data.synthetic_images=4", *TINY)
    assert "pascal_seg: miou =" in demo.stdout
    saved = yaml.safe_load((tmp_path / "demo" / "config.yaml").read_text())
    assert saved["task"]["crop_size"] == 64 and saved["model"]["num_classes"] == 21  # the demo file and its base

    # the spelling of the docs, `configs/...`, from a folder that has no configs/
    run_installed(installed, cwd, "pretrain", "--config", "configs/pretrain/demo.yaml", "--synthetic",
                  f"output_dir={tmp_path / 'pretrain'}", "train.epochs=null", "train.steps=2", *TINY)
    saved = yaml.safe_load((tmp_path / "pretrain" / "config.yaml").read_text())
    assert saved["model"]["name"] == "rs26-w0.25" and saved["train"]["nesterov"] is True  # demo.yaml, recipe.yaml


def test_a_config_is_a_file_or_a_packaged_name(tmp_path, monkeypatch):
    packaged = packaged_configs() / "pretrain" / "rs50_i160.yaml"
    assert find_config("pretrain/rs50_i160.yaml") == packaged
    assert find_config("configs/pretrain/rs50_i160.yaml") == packaged  # the source checkout's spelling
    mine = tmp_path / "pretrain" / "rs50_i160.yaml"
    mine.parent.mkdir()
    mine.write_text("seed: 3\n")
    monkeypatch.chdir(tmp_path)
    assert find_config("pretrain/rs50_i160.yaml") == Path("pretrain/rs50_i160.yaml")  # a file that exists wins
    assert find_config(str(mine)) == mine
    with pytest.raises(ConfigError, match=r"config file not found: pretrain/rs51\.yaml; looked for .*rs51\.yaml "
                                          r"and .*configs/pretrain/rs51\.yaml"):
        find_config("pretrain/rs51.yaml")
    # a typo of a packaged name names it (the demo config, one letter off, was only "not found")
    with pytest.raises(ConfigError, match=r"not found: downstream/pascal_seg_dmo\.yaml; did you mean "
                                          r"'downstream/pascal_seg_demo\.yaml'\?; looked for"):
        find_config("downstream/pascal_seg_dmo.yaml")


def test_a_base_is_beside_its_file_or_a_packaged_name(tmp_path):
    packaged = load_config(PretrainConfig, "pretrain/rs50_i160.yaml")
    child = tmp_path / "mine.yaml"
    child.write_text("base: pretrain/rs50_i160.yaml\nseed: 5\n")
    config = load_config(PretrainConfig, child)
    assert config.seed == 5 and config.train == packaged.train and config.model == packaged.model
    child.write_text("base: configs/pretrain/nothing.yaml\n")
    with pytest.raises(ConfigError, match=r"not found: configs/pretrain/nothing\.yaml; .* \(the `base:` of .*mine"):
        load_config(PretrainConfig, child)
    child.write_text("base: [a.yaml, b.yaml]\n")
    with pytest.raises(ConfigError, match="`base:` must name one file"):
        load_config(PretrainConfig, child)
