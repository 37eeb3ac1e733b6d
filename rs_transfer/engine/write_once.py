"""Generated (`--synthetic`) datasets, written once and atomically, also under torchrun.

Every task's synthetic writer goes through `write_once`: the data is written into a hidden sibling folder and
renamed into place when complete, so a folder at `root` is always a whole dataset, and a run killed while
writing leaves only the hidden folder, which the next writer on that host removes. Under torchrun or srun, local
rank 0 of each node writes (read from the launcher's environment, distributed.launcher_env: the process group
does not exist yet when data is prepared) and the other ranks wait.
"""

import logging
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Callable

from rs_transfer.engine.distributed import launcher_env
from rs_transfer.errors import UserError
from rs_transfer.files import FileWriteError, make_dir

log = logging.getLogger(__name__)


def write_once(root: str | Path, write: Callable[[Path], object], timeout_s: float = 600) -> Path:
    """Make `root` by calling `write(folder)` unless it already holds data; returns `root`.

    A non-empty `root` is used as it is (a user's own data, or a dataset written earlier: written datasets only
    ever appear whole). An empty `root` (a folder the user made) is replaced. Raises FileWriteError (one line
    naming `root` and the OS's reason) when the disk is read-only or full, with nothing left behind, and UserError
    when local rank 0 has not finished within `timeout_s` seconds.
    """
    root = Path(root)
    if _has_data(root):
        return root
    _, _, local_rank = launcher_env()
    if local_rank != 0:
        deadline = time.monotonic() + timeout_s
        while not _has_data(root):
            if time.monotonic() > deadline:
                raise UserError(f"waited {timeout_s:.0f} s for local rank 0 to write the dataset {root}")
            time.sleep(0.2)
        return root
    partial = root.with_name(f".{root.name}.partial-{socket.gethostname()}-{os.getpid()}")
    make_dir(root.parent, "the folder that holds the generated dataset")
    try:
        _remove_abandoned(root)
        shutil.rmtree(partial, ignore_errors=True)
        write(partial)
        if root.is_dir() and not any(root.iterdir()):
            root.rmdir()
        partial.rename(root)
    except BaseException as error:
        shutil.rmtree(partial, ignore_errors=True)
        if _has_data(root):  # another node's writer finished first (a shared file system): use its copy
            return root
        if isinstance(error, OSError):  # a read-only or full disk is the user's to fix, not a bug
            raise FileWriteError(f"cannot write the generated dataset {root}: {error.strerror or error} "
                                    "(nothing was left behind; free space or choose another folder)") from None
        raise
    return root


def _has_data(root: Path) -> bool:
    return root.is_dir() and any(root.iterdir())


def _remove_abandoned(root: Path) -> None:
    """Partial folders of writers on this host that no longer run (killed mid-write)."""
    prefix = f".{root.name}.partial-{socket.gethostname()}-"
    for path in root.parent.glob(f"{prefix}*"):
        pid = path.name[len(prefix):]
        if pid.isdigit() and not _running(int(pid)):
            log.info("removing %s, a dataset half-written by a killed run", path)
            shutil.rmtree(path, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
