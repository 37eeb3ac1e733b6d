"""Generated datasets are written once and whole: a kill while writing never leaves a dataset that a rerun trusts,
and a read-only or full disk is one error line that leaves nothing behind."""

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine_toy import script_env
from rs_transfer.engine.write_once import write_once
from rs_transfer.errors import UserError

KILL_WHILE_WRITING = """
import os, signal, sys
from pathlib import Path
from rs_transfer.pretrain import synthetic
from rs_transfer.pretrain.config import PretrainConfig
from rs_transfer.pretrain.run import make_synthetic

written = []
real = Path.write_bytes
def dying_write_bytes(self, data):
    written.append(self)
    if len(written) == 4 * 64 + 10:  # the training split is done, 10 validation images are written
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, data)
Path.write_bytes = dying_write_bytes
config = PretrainConfig()
config.output_dir = sys.argv[1]
make_synthetic(config)
"""


def count_images(root):
    return {split: len(list((root / split).rglob("*.*"))) for split in ("train", "val")}


@pytest.mark.slow  # a Python process that imports torch
def test_a_rerun_after_a_kill_during_synthetic_pretraining_data_gets_the_whole_dataset(tmp_path):
    from rs_transfer.pretrain.config import PretrainConfig
    from rs_transfer.pretrain.run import make_synthetic

    killed = subprocess.run([sys.executable, "-c", KILL_WHILE_WRITING, str(tmp_path)], env=script_env(),
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    assert not (tmp_path / "synthetic_data").exists()  # only the hidden partial folder is there
    config = PretrainConfig()
    config.output_dir = str(tmp_path)
    root = make_synthetic(config)
    assert count_images(root) == {"train": 4 * 64, "val": 4 * 16}
    assert [p.name for p in tmp_path.iterdir()] == ["synthetic_data"]  # the killed writer's half is removed


def test_write_once_keeps_data_that_is_there_and_fills_an_empty_folder(tmp_path):
    def writer(folder):
        folder.mkdir()
        (folder / "data.txt").write_text("generated")

    (tmp_path / "users").mkdir()
    (tmp_path / "users" / "own.txt").write_text("mine")
    write_once(tmp_path / "users", writer)
    assert [p.name for p in (tmp_path / "users").iterdir()] == ["own.txt"]
    (tmp_path / "empty").mkdir()
    assert (write_once(tmp_path / "empty", writer) / "data.txt").read_text() == "generated"


def test_a_writer_that_fails_leaves_nothing_behind(tmp_path):
    def failing(folder):
        folder.mkdir()
        (folder / "half.txt").write_text("half")
        raise OSError("disk full")

    # A disk error is the user's to fix: one line naming the dataset folder and the reason.
    with pytest.raises(UserError, match=r"^cannot write the generated dataset .*data: disk full \(nothing was left"):
        write_once(tmp_path / "data", failing)
    assert list(tmp_path.iterdir()) == []

    def buggy(folder):
        folder.mkdir()
        raise KeyError("a bug")

    with pytest.raises(KeyError):  # anything else is a bug and keeps its traceback
        write_once(tmp_path / "data", buggy)
    assert list(tmp_path.iterdir()) == []


def read_only_below(monkeypatch, folder):
    """Path.mkdir fails as on a read-only file system for every folder below `folder` (root ignores permission
    bits, so the tests cannot use them)."""
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if folder in self.parents:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)


def test_synthetic_data_root_on_a_read_only_disk_is_one_error_line_and_exit_2(tmp_path, monkeypatch, capsys):
    from rs_transfer.cli import main

    read_only = tmp_path / "read_only"
    read_only.mkdir()
    read_only_below(monkeypatch, read_only)
    code = main(["finetune", "--task", "cifar100", "--synthetic", f"data.root={read_only / 'cifar'}",
                 f"output_dir={tmp_path / 'run'}"])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: cannot write the generated dataset {read_only / 'cifar'}: Read-only file system (nothing was left "
        "behind; free space or choose another folder)")
    assert list(read_only.iterdir()) == []
