"""cifar100's layout check (TransferTaskDeclaration.check_data): what `finetune` answers before torch is imported. The
pickles' reading and their errors are in test_downstream_data.py."""

import re

import pytest

from rs_transfer.config import ConfigError
from rs_transfer.downstream import cifar100, finetune
from rs_transfer.errors import DataError


CASES = [  # (missing piece, error, its message); {root}: data.root, {folder}: the cifar-100-python folder
    ("data.root", ConfigError, "data.root is not set: give data.root=DIR, the folder that holds CIFAR-100"),
    ("the data.root folder", DataError, "CIFAR-100 (a cifar-100-python folder) not found under data.root={root}; "
                                        "looked for: {root}/cifar-100-python, {root}"),
    ("train", DataError, "missing {folder}/train: expected the CIFAR-100 python pickle 'train'"),
    ("test", DataError, "missing {folder}/test: expected the CIFAR-100 python pickle 'test'"),
]


@pytest.mark.parametrize("inside", [False, True])  # data.root holds cifar-100-python/, or is it
@pytest.mark.parametrize("piece, error, message", CASES)
def test_check_data_names_the_missing_piece(tmp_path, inside, piece, error, message):
    folder = tmp_path / "data" / "cifar-100-python"
    folder.mkdir(parents=True)
    for split in ("train", "test"):
        (folder / split).write_bytes(b"read by build, not by check_data")
    root = folder if inside else tmp_path / "data"
    config = finetune.make_config("cifar100", overrides=[f"data.root={root}"])
    cifar100.check_data(config)
    if piece == "data.root":
        config.data.root = None
    elif piece == "the data.root folder":
        (tmp_path / "data").rename(tmp_path / "elsewhere")
    else:
        (folder / piece).unlink()
    with pytest.raises(error, match=re.escape(message.format(root=root, folder=folder))):
        cifar100.TASK.check_data(config)
