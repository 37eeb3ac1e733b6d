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
