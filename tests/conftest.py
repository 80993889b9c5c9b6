import os
import tempfile

import pytest
import torch

# The tests' feature cache (command_line.FEATURE_CACHE reads it at import): never the user's ~/.cache.
os.environ["DPC_FEATURE_CACHE"] = tempfile.mkdtemp(prefix="dpc_features_")


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """The test models are tiny: one thread is faster than several, and on a busy 2-core machine
    torch's threads spin-wait (a module took 60-75 s instead of 10 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
