import os

import pytest
import torch

# Subprocesses the tests start (torchrun, CLI runs) inherit this; this process is set by the fixture below.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    # Tiny CPU models gain nothing from intra-op threads, and on a shared 2-core machine two threads per
    # process were measured 4-70x slower than one (thread contention with the other test processes).
    torch.set_num_threads(1)


@pytest.fixture
def deterministic():
    """For tests that call engine_toy.main in-process: it turns on deterministic algorithms and one thread."""
    threads = torch.get_num_threads()
    yield
    torch.use_deterministic_algorithms(False)
    torch.set_num_threads(threads)


# The suite writes only into its temp folders: a file it leaves in the checkout (a stray folder named "'" holding a
# test's run was once committed) fails the run. Checked by the controlling process, once, around the whole session.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD_LITTER = ("__pycache__", ".pytest_cache", ".egg-info", ".venv")  # what running Python and pytest leave


def checkout_files() -> set:
    """Untracked and ignored files of the checkout (git status), less BUILD_LITTER; None outside a git checkout."""
    import subprocess

    try:
        listed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all", "--ignored"], cwd=REPO,
                                capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {line[3:] for line in listed.splitlines()
            if line[:2] in ("??", "!!") and not any(part in line for part in BUILD_LITTER)}


def pytest_sessionstart(session):
    if not hasattr(session.config, "workerinput"):  # the controller, not an xdist worker
        session.config.checkout_before = checkout_files()


def pytest_sessionfinish(session, exitstatus):
    before = getattr(session.config, "checkout_before", None)
    after = checkout_files() if before is not None else None
    if after is not None and after - before:
        new = sorted(after - before)
        session.config.get_terminal_writer().line(
            f"the tests wrote into the checkout {REPO}: {', '.join(new[:5])}{' ...' if len(new) > 5 else ''}",
            red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
