"""Gloo ranks forked from the test process, with the variables torchrun gives the ranks of one node (world size 1: a
plain process, as `python -m rs_transfer` is).

For tests of what ranks compute together (a shard each, sums over ranks, DDP gradients), not of how a launcher
starts them: test_launch_templates.py runs the docs' torchrun and srun commands and test_engine_faults.py kills and
restarts torchrun groups, so torchrun itself stays tested. A fresh process pays ~7 s of CPU importing torch,
torchvision, timm and torchmetrics (measured with `python -X importtime`), and a torchrun launch is three of them
(the agent and two ranks); a rank forked from the test process starts with all of that imported.
Python 3.11 forks a process with threads (xdist's) without a warning: the child only runs the rank and leaves with
os._exit, never touching the parent's threads or their locks.
"""

import io
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_env(rank: int, world_size: int, port: int) -> dict:
    """What `torchrun --standalone --nproc_per_node WORLD_SIZE` sets for `rank` (the agent's store aside: each
    group makes its own, as torchrun's first worker group does). World size 1: none, a plain `python -m rs_transfer`."""
    if world_size == 1:
        return {"OMP_NUM_THREADS": "1"}
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "GROUP_RANK": "0", "ROLE_RANK": str(rank),
            "WORLD_SIZE": str(world_size), "LOCAL_WORLD_SIZE": str(world_size), "ROLE_WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "TORCHELASTIC_RESTART_COUNT": "0",
            "TORCHELASTIC_MAX_RESTARTS": "0", "TORCHELASTIC_RUN_ID": "forked", "OMP_NUM_THREADS": "1"}


def _rank(target, args, env: dict, out: Path, err: Path) -> int:
    """In the child: its environment, its own stdout/stderr files, a fresh logging setup (not pytest's capture
    handlers), a fresh interpreter's signal handlers and warning filters (not the suite's warnings-as-errors: a
    launched rank prints a warning and goes on), then target(*args); the exit code."""
    os.environ.update(env)
    for fd, path in ((1, out), (2, err)):
        opened = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(opened, fd)
        os.close(opened)
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True)
    for handler in list(logging.root.handlers):
        logging.root.removeHandler(handler)
    logging.root.setLevel(logging.WARNING)
    warnings.resetwarnings()
    for category in (ResourceWarning, ImportWarning, PendingDeprecationWarning, DeprecationWarning):
        warnings.simplefilter("ignore", category)
    warnings.filterwarnings("default", category=DeprecationWarning, module="__main__")  # Python's defaults, in order
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a fresh interpreter's handlers: Ctrl-C raises
    for number in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(number, signal.SIG_DFL)
    try:
        code = target(*args)
        return 0 if code is None else int(code)
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except BaseException:  # whatever ends the rank: its traceback on stderr, as a rank's own would be
        traceback.print_exc()
        return 1


def run_ranks(target, *args, world_size: int = 2, timeout: float = 300,
              env: dict | None = None) -> subprocess.CompletedProcess:
    """target(*args) in `world_size` ranks forked from this process (Ranks), waited for."""
    return Ranks(target, *args, world_size=world_size, env=env).wait(timeout)


class Ranks:
    """target(*args) running in `world_size` ranks forked from this process, each with torchrun_env and `env`, all
    in one new process group (the ranks and their loader workers, as a torchrun launched with start_new_session);
    a rank's exit code is target's return value (None: 0), 1 and the traceback on stderr for an exception."""

    def __init__(self, target, *args, world_size: int = 2, env: dict | None = None):
        self.name = f"{getattr(target, '__name__', target)}{args}"
        self.folder = tempfile.TemporaryDirectory(prefix="ranks")
        self.files = [(Path(self.folder.name) / f"rank{r}.out", Path(self.folder.name) / f"rank{r}.err")
                      for r in range(world_size)]
        port = free_port()
        sys.stdout.flush()
        sys.stderr.flush()
        self.pids, self.group = [], 0
        for rank in range(world_size):
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    os.setpgid(0, self.group)
                    code = _rank(target, args, {**(env or {}), **torchrun_env(rank, world_size, port)},
                                 *self.files[rank])
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            try:  # also here, so that the group exists before this returns (whichever of the two runs first)
                os.setpgid(pid, self.group or pid)
            except PermissionError:  # the child set it already and changed nothing else since: the same group
                pass
            self.group = self.group or pid
            self.pids.append(pid)

    def wait(self, timeout: float = 300) -> subprocess.CompletedProcess:
        """Like torchrun, the first rank to fail ends the others (SIGKILL). A CompletedProcess: returncode the first
        failure's code (0 when every rank succeeded; -9 for ranks killed at the timeout), stdout and stderr the
        ranks' outputs joined in rank order."""
        try:
            failed = [code for code in _wait(self.pids, timeout) if code]
        except BaseException:  # Ctrl-C or an error here: no rank may outlive the test (they are in their own group)
            self.kill()
            raise
        outputs = [(out.read_text(errors="replace"), err.read_text(errors="replace")) for out, err in self.files]
        self.folder.cleanup()
        return subprocess.CompletedProcess([self.name], failed[0] if failed else 0, "".join(o for o, _ in outputs),
                                           "".join(e for _, e in outputs))

    def signal(self, number: int) -> None:
        """Send signal `number` to the ranks' process group (their loader workers too), as SLURM does."""
        try:
            os.killpg(self.group, number)
        except ProcessLookupError:  # every one of them had ended already
            pass

    def kill(self) -> None:
        """SIGKILL the ranks' process group, as a node that dies; reaps the ranks."""
        self.signal(signal.SIGKILL)
        for pid in self.pids:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:  # reaped already
                pass
        self.folder.cleanup()


def _wait(pids: list, timeout: float) -> list:
    """Exit codes of `pids` in the order they ended (negative: the signal that ended it); the first failure or the
    timeout kills the ones still running."""
    codes, deadline = {}, time.monotonic() + timeout
    while len(codes) < len(pids):
        for pid in pids:
            if pid in codes:
                continue
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                codes[pid] = os.waitstatus_to_exitcode(status)
        if any(codes.values()) or time.monotonic() > deadline:
            for pid in pids:
                if pid not in codes:
                    os.kill(pid, signal.SIGKILL)
                    codes[pid] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        time.sleep(0.05)
    return list(codes.values())  # dicts keep insertion order: the order they ended
